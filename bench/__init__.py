"""smtpgate benchmarks: `make bench`."""
