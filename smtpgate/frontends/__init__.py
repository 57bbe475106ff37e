"""Front ends: each translates its protocol into the link service's Envelope and back."""
