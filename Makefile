# opslib: `make demo` and `make test` set everything up themselves (a .venv with opslib installed).
# The migrate-* targets are the Database Migrations Guide's, each a thin call of `opslib`.
# Target database: DATABASE_URL, or the embedded PostgreSQL under .opslib/ when it is unset.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
OPSLIB := $(BIN)/opslib
STAMP  := $(VENV)/.installed
AIRFLOW_STAMP := .venv-airflow/.installed
PGBACKREST := $(VENV)/bin/pgbackrest

# What users pass (make migrate-create message="fix users' emails") never reaches the shell as text:
# each variable is taken unexpanded ($(value ...), so make expands no $(...) in it either), exported,
# and recipes read it as "$$name". Add any new user variable to this list and quote it the same way.
USER_VARS := message revision label confirm out runbook rows seed
$(foreach v,$(USER_VARS),$(if $(filter undefined,$(origin $(v))),,$(eval override $(v) := $$(value $(v)))))
export $(USER_VARS)

.DEFAULT_GOAL := help
.PHONY: help install pgbackrest airflow-venv demo test goldens lab migrate-create migrate-create-manual migrate-up migrate-down \
        migrate-down-to migrate-status migrate-show bench backup-db verify-setup \
        deploy-prod rollback-prod db-reset pre-deploy-check browser audit-report init-prod seed-demo db-setup rehearse

help:
	@echo "make demo                          bring the sample database to head and show its status"
	@echo "make test                          run the whole test suite against a real PostgreSQL"
	@echo "make airflow-venv                  Apache Airflow 3 in .venv-airflow, for opslib.airflow (make test makes it)"
	@echo "make lab [runbook=deploy]          a new run of a runbook, its own notebook opened in JupyterLab (opslib open)"
	@echo "make goldens                       make the runbooks' expected outputs (tests/goldens/) again"
	@echo "make bench                         compare opslib with bare Alembic, pg_dump and pg_restore, as ratios"
	@echo "make migrate-create message=...    autogenerate a revision from the models"
	@echo "make migrate-create-manual message=...  create an empty revision"
	@echo "make migrate-up | migrate-down | migrate-down-to revision=... | migrate-status | migrate-show revision=..."
	@echo "make backup-db [label=...]         pg_dump the database into backups/, with a manifest"
	@echo "make deploy-prod confirm=DB [revision=...]    the deploy runbook in production (backup, upgrade, verify)"
	@echo "make rollback-prod confirm=DB [revision=...]  the rollback runbook in production (one step by default)"
	@echo "make db-reset [confirm=DB]         the reset runbook (refused in production)"
	@echo "make init-prod                     schema to head + admin user, settings, CMS pages, email templates (OPSLIB_ADMIN_EMAIL/_PASSWORD)"
	@echo "make seed-demo [rows=N] [seed=S]   load demo users and products with COPY (refused in production)"
	@echo "make db-setup                      init-prod, then seed-demo"
	@echo "make rehearse [revision=...]       upgrade, downgrade, upgrade a copy of the target; compare; drop the copy"
	@echo "make verify-setup                  check connectivity, versions, client tools, Alembic config, backups folder"
	@echo "make pre-deploy-check [revision=...]  heads, pending revisions, squawk lint of their SQL, naming, drift, backup"
	@echo "make audit-report [out=DIR]        the records as a static HTML site, checked against the ledger, + index.png"
	@echo "make browser                       install Debian's chromium (as root) for the report's screenshot and tests"

# The venv is rebuilt when pyproject.toml changes: opslib with its test tools and JupyterLab (the
# `lab` extra: `opslib open`, and the suite's JupyterLab tests).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lab]'
	touch $(STAMP)

# Everything `make test` needs, so that the suite then runs with no network: the venv, Airflow's own
# environment (about 300 MB from PyPI) and Debian's Chromium (as root; apt).
install: $(STAMP) $(AIRFLOW_STAMP) $(PGBACKREST) browser

# pgBackRest, for physical backups and point-in-time recovery (backup_method = "pgbackrest"): Debian's
# package from trixie, because bookworm's (2.45) predates the embedded server's PostgreSQL 18. apt downloads
# it and checks it against Debian's signed index, in a private apt state under .venv (the machine's apt
# sources are not touched, and no root is needed); only its binary is kept, in the venv. It runs on bookworm's
# libraries (libpq, libssl, libxml2, libssh2, lz4, zstd, bz2). OPSLIB_PGBACKREST or PATH name another one.
PGBACKREST_SUITE ?= trixie
$(PGBACKREST): | $(STAMP)
	@echo "== pgBackRest from Debian $(PGBACKREST_SUITE), into $(VENV)/bin"
	@set -e; apt=$(VENV)/apt-pgbackrest; rm -rf $$apt; mkdir -p $$apt/lists/partial $$apt/cache/archives/partial $$apt/deb; \
	  echo "deb http://deb.debian.org/debian $(PGBACKREST_SUITE) main" > $$apt/sources.list; \
	  opts="-o Dir::Etc::SourceList=$$PWD/$$apt/sources.list -o Dir::Etc::SourceParts=/dev/null \
	    -o Dir::State::Lists=$$PWD/$$apt/lists -o Dir::Cache=$$PWD/$$apt/cache -o Dir::Cache::pkgcache= \
	    -o Dir::Cache::srcpkgcache= -o Debug::NoLocking=1 -o APT::Sandbox::User=$$(id -un)"; \
	  apt-get $$opts -qq update; \
	  (cd $$apt/deb && apt-get $$opts -qq download pgbackrest); \
	  dpkg-deb -x $$apt/deb/pgbackrest_*.deb $$apt/root; \
	  install -m 755 $$apt/root/usr/bin/pgbackrest $@; rm -rf $$apt; $@ version

pgbackrest: $(PGBACKREST)

# Apache Airflow 3 for opslib.airflow's DAG factory, in an environment of its own (its pins clash with
# ours): Airflow, and opslib without its dependencies (a DAG file imports only opslib.airflow, which calls
# the opslib of .venv for the plan and the runs).
$(AIRFLOW_STAMP): pyproject.toml
	test -x .venv-airflow/bin/python || $(PYTHON) -m venv .venv-airflow
	.venv-airflow/bin/python -m pip install --quiet --upgrade pip
	.venv-airflow/bin/python -m pip install --quiet 'apache-airflow>=3,<4'
	.venv-airflow/bin/python -m pip install --quiet --no-deps -e .
	touch $(AIRFLOW_STAMP)

airflow-venv: $(AIRFLOW_STAMP)

demo: $(STAMP)
	@echo "== opslib demo: the deploy runbook, run end to end on the sample application's database"
	@if [ -z "$$DATABASE_URL" ]; then echo "== DATABASE_URL is unset: using the embedded PostgreSQL kept in .opslib/"; $(OPSLIB) db start; fi
	@echo; echo "== 1. Put the database at an older revision (0003), so that there is something to deploy"
	@$(OPSLIB) upgrade 0003 >/dev/null 2>&1 || $(OPSLIB) downgrade 0003 >/dev/null
	@$(OPSLIB) status
	@echo; echo "== 2. Run the deploy runbook headlessly (opslib run deploy): preflight, backup, upgrade, verify"
	@$(OPSLIB) run deploy
	@echo; echo "== 3. Where the database stands afterwards"
	@$(OPSLIB) status
	@echo; echo "== The executed notebook and its record are in records/ (ledger.jsonl lists every run)."
	@echo "== Next: make lab (a new deploy run, step by step in JupyterLab), make audit-report (the records as HTML),"
	@echo "   make rollback-prod confirm=NAME, make test."
	@if [ -z "$$DATABASE_URL" ]; then echo "== The embedded server keeps running; stop it with: $(OPSLIB) db stop"; fi

# The whole suite against a PostgreSQL server (127.0.0.1:5432 if it answers, else the embedded one), then
# the tests of connection handling again on the embedded server (Unix socket, ?host= URLs), as users
# without a server run them. Each prints its 15 slowest tests.
test: install
	$(BIN)/python -m pytest
	OPSLIB_TEST_SERVER=embedded $(BIN)/python -m pytest -m connections

# Debian's Chromium renders the audit report in its tests and takes its screenshot. As root (CI) it
# is installed when missing; anyone else is told the one command to run.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "== installing Debian's chromium (for the audit report)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make $@: the audit report needs Chromium: sudo apt-get install chromium" >&2; exit 2; fi; }

bench: $(STAMP) $(PGBACKREST)
	$(BIN)/python benchmarks/bench_migrate.py
	$(BIN)/python benchmarks/bench_runbooks.py
	$(BIN)/python benchmarks/bench_backup.py
	$(BIN)/python benchmarks/bench_locks.py
	$(BIN)/python benchmarks/bench_report.py
	$(BIN)/python benchmarks/bench_batch.py
	$(BIN)/python benchmarks/bench_fleet.py
	$(BIN)/python benchmarks/bench_approvals.py
	$(BIN)/python benchmarks/bench_pitr.py

# The runbooks' expected outputs (tests/goldens/*.ipynb), made again on purpose: review their diff like code.
goldens: $(STAMP)
	GOLDENS=write .venv/bin/pytest -q -n 0 tests/test_runbooks.py -k golden

# A new run of a runbook (deploy unless runbook= says), its own notebook in records/ opened in
# JupyterLab; saving after its summary seals the record. The templates in runbooks/ never change.
lab: $(STAMP)
	@if [ -z "$$DATABASE_URL" ]; then echo "== DATABASE_URL is unset: using the embedded PostgreSQL kept in .opslib/"; $(OPSLIB) db start; fi
	$(OPSLIB) open "$${runbook:-deploy}"

# --- the guide's migration targets ---------------------------------------------------------------

# $(call require,VAR,EXAMPLE): stop with one line (exit 2) when VAR is unset or blank.
require = $(if $(value $(1)),,$(error make $@: give $(1)=..., e.g. make $@ $(1)=$(2)))
# $(call opt,FLAG,VAR): the shell words FLAG "$VAR" when VAR is given and not blank, else nothing.
opt = $(if $(value $(2)),$(1) "$$$(2)")

migrate-create: $(STAMP)
	$(call require,message,add_user_profile_table)
	$(OPSLIB) revision --autogenerate -m "$$message"

migrate-create-manual: $(STAMP)
	$(call require,message,add_custom_indexes)
	$(OPSLIB) revision -m "$$message"

migrate-up: $(STAMP)
	$(OPSLIB) upgrade head

migrate-down: $(STAMP)
	$(OPSLIB) downgrade -1

migrate-down-to: $(STAMP)
	$(call require,revision,abc123)
	$(OPSLIB) downgrade "$$revision"

migrate-status: $(STAMP)
	$(OPSLIB) status
	@echo
	$(OPSLIB) history

migrate-show: $(STAMP)
	$(call require,revision,abc123)
	$(OPSLIB) show "$$revision"

# --- backups (the guide's "Backup and Safety") --------------------------------------------------------

backup-db: $(STAMP)
	$(OPSLIB) backup $(call opt,--label,label)

verify-setup: $(STAMP)
	$(OPSLIB) verify-setup

pre-deploy-check: $(STAMP)
	$(OPSLIB) check $(call opt,--target,revision)

# --- the guide's production workflows, as runbooks (records in records/) -------------------------------

deploy-prod: $(STAMP)
	$(OPSLIB) run deploy --env production -p confirm "$$confirm" $(call opt,-p target_revision,revision)

rollback-prod: $(STAMP)
	$(OPSLIB) run rollback --env production -p confirm "$$confirm" $(call opt,-p target_revision,revision)

db-reset: $(STAMP)
	$(OPSLIB) run reset $(call opt,-p confirm,confirm)

# --- the guide's database initialization ----------------------------------------------------------------

init-prod: $(STAMP)
	$(OPSLIB) init-prod

seed-demo: $(STAMP)
	$(OPSLIB) seed-demo $(call opt,--rows,rows) $(call opt,--seed,seed)

db-setup: init-prod seed-demo

# The guide's "test migrations on a copy of production data": never changes the target.
rehearse: $(STAMP)
	$(OPSLIB) rehearse $(call opt,-p target_revision,revision)

# --- records, for auditors --------------------------------------------------------------------------

audit-report: $(STAMP) browser
	$(OPSLIB) audit report --screenshot $(call opt,--out,out)
