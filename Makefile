# smtpgate: the two first commands on a fresh machine are `make serve` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= config/smtpgate.yaml
FUZZ_SECONDS ?= 60

.PHONY: venv serve test system-deps bench soak fuzz mutate check-config clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

serve: venv
	$(BIN)/smtpgate serve -c $(CONFIG)

check-config: venv
	$(BIN)/smtpgate check-config -c $(CONFIG)

# Debian packages the integration tests use (Postfix as a real upstream and as a
# client; swaks, msmtp and curl as mail clients, libsasl2-modules for Postfix's
# AUTH PLAIN/LOGIN; Chromium and its driver for the admin pages' browser test).
# Installed only when running as root and missing; otherwise those tests skip
# (and fail under CI).
CLIENT_PACKAGES := swaks msmtp curl

system-deps:
	@if [ "$$(id -u)" = 0 ] && ! command -v postfix >/dev/null 2>&1 && [ ! -x /usr/sbin/postfix ]; then \
		echo "installing Debian package postfix"; \
		apt-get update -qq; \
		echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null; \
	fi
	@missing=""; \
	for p in $(CLIENT_PACKAGES); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if command -v dpkg >/dev/null 2>&1 && ! dpkg -s libsasl2-modules >/dev/null 2>&1; then missing="$$missing libsasl2-modules"; fi; \
	if [ "$$(id -u)" = 0 ] && [ -n "$$missing" ]; then \
		echo "installing Debian packages$$missing"; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@if [ "$$(id -u)" = 0 ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then \
		echo "installing Debian packages chromium chromium-driver"; \
		apt-get update -qq; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

# The pure core must stay fully covered; the report for the whole package is printed too.
CORE := smtpgate/mail/addresses.py,smtpgate/mail/stamp.py,smtpgate/mail/required_headers.py,smtpgate/linking/references.py,smtpgate/mail/headers.py,smtpgate/mail/rewrite.py,smtpgate/mail/dataguard.py,smtpgate/mail/msgid.py,smtpgate/mail/dkim.py,smtpgate/linking/plan.py,smtpgate/linking/decision.py,smtpgate/linking/inbound.py,smtpgate/linking/share.py,smtpgate/frontends/milter/codec.py

test: venv system-deps
	$(BIN)/lint-imports
	$(BIN)/pytest --cov=smtpgate --cov-branch --cov-report=term-missing:skip-covered
	$(BIN)/coverage report --include='$(CORE)' --fail-under=100

# Side by side with Postfix (bench/RESULTS.md); needs root, Debian's postfix and PostgreSQL.
# A quick run: make bench BENCH_MESSAGES=500 BENCH_ROUNDS=1
BENCH_MESSAGES ?= 5000
BENCH_ROUNDS ?= 3
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

bench: venv system-deps $(BENCH_STAMP)
	$(BIN)/python -m bench --messages $(BENCH_MESSAGES) --rounds $(BENCH_ROUNDS) $(BENCH_ARGS)

# Clients that vanish and faults that strike, not part of `make test` (bench/soak.py):
# SOAK_MINUTES of mixed traffic against 2 workers on PostgreSQL; fails on any breach of
# its invariants and writes bench/SOAK.md. Needs root, Debian's postfix and PostgreSQL.
SOAK_MINUTES ?= 10

soak: venv system-deps $(BENCH_STAMP)
	SOAK_MINUTES=$(SOAK_MINUTES) $(BIN)/python -m bench.soak

fuzz: venv
	$(BIN)/pip install -q -e '.[fuzz]'
	for target in tests/fuzz/fuzz_*.py; do \
		$(BIN)/python $$target -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done
	# The SMTP state machine with its long profile (tests/frontends/smtp/test_smtp_state_machine.py).
	SMTPGATE_FUZZ=1 $(BIN)/pytest -q -p no:cacheprovider tests/frontends/smtp/test_smtp_state_machine.py

# Mutation testing, not part of `make test`. First the pure core: mutmut makes small changes to
# the core modules ([tool.mutmut] in pyproject.toml) and runs the core's unit tests against each;
# a mutant that survives is a change no test notices. MUTANTS picks some by name
# (MUTANTS='smtpgate.linking.references*'); MUTATE_SECONDS bounds the run, whose results are kept
# in mutants/ (a later run goes on from them). `mutmut show NAME` shows one mutant.
# Then the I/O layers (tests/support/mutate_io.py): each module alone against the test files that
# claim it, in mutants-io/<module>/, for at most MUTATE_MODULE_SECONDS each, with its score and
# survivors.txt. MUTATE_MODULES picks modules (MUTATE_MODULES=smtpgate/metrics.py; the core run
# is skipped then); MUTATE_MODULES=none runs the core only. MUTATE_SAMPLE=N judges a random sample
# of N mutants per module (for modules too large for the budget; the score comes with its 95 %
# interval). docs/mutation.md has the scores per module and why each survivor lives (a test kills
# it now, or it is equivalent).
MUTANTS ?=
MUTATE_SECONDS ?= 1800
MUTATE_MODULES ?=
MUTATE_MODULE_SECONDS ?= 600
MUTATE_SAMPLE ?= 0
mutate: venv
	$(BIN)/pip install -q -e '.[mutate]'
	@if [ -z "$(MUTATE_MODULES)" ] || [ "$(MUTATE_MODULES)" = none ]; then \
		status=0; timeout $(MUTATE_SECONDS) $(BIN)/mutmut run --max-children 2 $(MUTANTS) > mutants.log 2>&1 || status=$$?; \
		if [ $$status = 124 ]; then echo "stopped after $(MUTATE_SECONDS)s: the score counts the mutants judged so far"; \
		elif [ $$status != 0 ]; then tail -n 30 mutants.log; exit $$status; fi; \
		$(BIN)/mutmut results | grep -v ': not checked' || true; \
		$(BIN)/python -m tests.support.mutation_score; \
	fi
	@if [ "$(MUTATE_MODULES)" != none ]; then \
		MUTATE_MODULE_SECONDS=$(MUTATE_MODULE_SECONDS) MUTATE_SAMPLE=$(MUTATE_SAMPLE) \
			$(BIN)/python -m tests.support.mutate_io $(MUTATE_MODULES); \
	fi

clean:
	rm -rf $(VENV) var .pytest_cache .coverage test-artifacts mutants mutants.log mutants-io
