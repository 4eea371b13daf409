# collective.streamguard: `make run` serves a Plone site with the add-on,
# `make test` runs the whole test suite.  Both install what is missing.
# Override any of these with `make run PORT=8081` or the environment.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
HOST ?= 127.0.0.1
PORT ?= 8080
THREADS ?= 4
SITE_ID ?= Plone
ADMIN_USER ?= admin
ADMIN_PASSWORD ?= admin
TESTOPTS ?=
# The Plone release: 6.2 (the default) or 6.1.  Each has its own pins
# (constraints.txt and versions.cfg; constraints-6.1.txt and versions-6.1.cfg),
# its own virtualenv (.venv; .venv-6.1) and its own instance and data, so
# that a site made by one is never opened by the other.
PLONE ?= 6.2
PLONE_RELEASES := 6.2 6.1
ifeq ($(filter $(PLONE),$(PLONE_RELEASES)),)
$(error PLONE=$(PLONE): supported are $(PLONE_RELEASES))
endif
ifeq ($(PLONE),6.2)
SUFFIX :=
else
SUFFIX := -$(PLONE)
endif

VENV := .venv$(SUFFIX)
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
CONSTRAINTS := constraints$(SUFFIX).txt
INSTANCE := $(CURDIR)/instance$(SUFFIX)
VAR := $(CURDIR)/var$(SUFFIX)

export SITE_ID ADMIN_USER ADMIN_PASSWORD

.PHONY: help install install-test system-packages cluster-packages instance run cluster test-cluster test test-buildout buildout pins lint format i18n clean

help:
	@echo "make run    serve http://$(HOST):$(PORT)/$(SITE_ID) (login $(ADMIN_USER))"
	@echo "make test   run the whole test suite"
	@echo "make cluster   ZEO, INSTANCES=$(INSTANCES) instances and HAProxy on http://$(HOST):$(PORT),"
	@echo "               WORKERS=$(WORKERS) streamguard-worker processes and Redis (WORKERS=0: none)"
	@echo "make test-cluster   start make cluster briefly and check it answers"
	@echo "make test-buildout   install with buildout and check the instance answers"
	@echo "make pins   regenerate constraints.txt and versions.cfg"
	@echo "PLONE=6.1   any of these on Plone 6.1 instead of 6.2, in .venv-6.1 with"
	@echo "            constraints-6.1.txt (make test PLONE=6.1, make run PLONE=6.1)"
	@echo "make lint   ruff and zpretty checks; make format fixes what they find"
	@echo "make i18n   refresh the translation template (locales/*.pot)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(CONSTRAINTS) pip setuptools wheel

# Stamps, so that a second run installs nothing; they are remade when the
# pins or the package metadata change.
$(VENV)/.installed-plone: $(BIN)/python setup.py $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) pip setuptools wheel -e ".[plone]"
	@touch $@

$(VENV)/.installed-cluster: $(VENV)/.installed-plone
	$(PIP) install -c $(CONSTRAINTS) -e ".[plone,cluster,workers]"
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed-plone
	$(PIP) install -c $(CONSTRAINTS) -e ".[test]"
	@touch $@

# Classic ZServer, for its tests only (tests/zserver_compat.py loads it).
# Never into site-packages: its wheel also ships top-level webdav, Lifetime
# and Signals whose Python 2 files overwrite Zope's own (and uninstalling it
# deletes them).  --no-deps: its dependencies are Zope's, already here.
ZSERVER_VERSION := 4.0.2
ZSERVER_DIR := $(VENV)/zserver
$(ZSERVER_DIR)/.installed-$(ZSERVER_VERSION): $(BIN)/python
	rm -rf $(ZSERVER_DIR)
	$(PIP) install --no-deps --target $(ZSERVER_DIR) ZServer==$(ZSERVER_VERSION)
	@touch $@

install: $(VENV)/.installed-plone
install-test: $(VENV)/.installed-test $(ZSERVER_DIR)/.installed-$(ZSERVER_VERSION) system-packages

# Debian packages, installed with apt-get where a command is missing:
# $(call apt-install,commands,packages).
define apt-install
	@missing=; for command in $(1); do \
	  command -v $$command >/dev/null || [ -x /usr/sbin/$$command ] || missing=1; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing $(2) with apt-get"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	  else \
	    echo "This needs Debian's $(2): sudo apt-get install $(2)"; \
	    exit 1; \
	  fi; \
	fi
endef

# The viewer's end-to-end test drives Debian's Chromium with its driver
# (browsers downloaded by test tools cannot be fetched on our machines); the
# vanished-peer test puts its client in a network namespace (iproute2's ip);
# the cluster tests put HAProxy in front of two instances; the worker tests
# start their own Redis (redis-server) on a free port.
SYSTEM_PACKAGES := chromium chromium-driver iproute2 haproxy redis-server
system-packages:
	$(call apt-install,chromium chromedriver ip haproxy redis-server,$(SYSTEM_PACKAGES))

# `make cluster` needs the balancer, and Redis for its workers.
CLUSTER_PACKAGES := haproxy redis-server
cluster-packages:
	$(call apt-install,haproxy redis-server,$(CLUSTER_PACKAGES))

# The instance's configuration is rendered on every run, so HOST, PORT and
# THREADS take effect; the data (var/) is kept.
instance: $(VENV)/.installed-plone
	@mkdir -p $(INSTANCE)/etc $(VAR)/filestorage $(VAR)/blobstorage $(VAR)/log $(VAR)/cache
	@for f in zope.conf zope.ini; do \
	  sed -e 's|@INSTANCE@|$(INSTANCE)|g' -e 's|@VAR@|$(VAR)|g' \
	      -e 's|@HOST@|$(HOST)|g' -e 's|@PORT@|$(PORT)|g' -e 's|@THREADS@|$(THREADS)|g' \
	      etc/$$f.in > $(INSTANCE)/etc/$$f; \
	done
	@cp etc/site.zcml $(INSTANCE)/etc/site.zcml

# Plone 6.1's plone.autoinclude 1 takes a z3c.autoinclude entry point's module
# from the distribution's normalized name (plone_app_caching, ...), which
# cannot be imported: it is told to go on without those packages' ZCML (most
# are included by Products.CMFPlone itself; plone.app.caching's is not).
ifeq ($(PLONE),6.1)
run: export AUTOINCLUDE_ALLOW_MODULE_NOT_FOUND_ERROR := 1
endif
run: instance
	$(BIN)/zconsole run $(INSTANCE)/etc/zope.conf scripts/create_site.py
	@echo
	@echo "  Plone site:  http://$(HOST):$(PORT)/$(SITE_ID)"
	@echo "  Login:       $(ADMIN_USER) / $(ADMIN_PASSWORD)"
	@echo "  Live logs:   http://$(HOST):$(PORT)/$(SITE_ID)/@@stream-log-viewer"
	@echo
	@# Parked streams hold a socket each: the add-on raises the soft open-files
	@# limit to the hard one (zope.ini sets asyncore_use_poll); see README.
	$(BIN)/runwsgi $(INSTANCE)/etc/zope.ini

# A cluster as production runs Plone: a ZEO server (runzeo, its data in
# var/zeo/), INSTANCES Zope instances as its clients (ports PORT+1 to
# PORT+INSTANCES, each with its own var/cluster/instanceN/ and log files) and
# HAProxy in front on PORT, with etc/haproxy.cfg.in (README: Deployment).
# scripts/cluster.py renders the configurations into cluster/, creates the
# site on the ZEO storage as `make run` does, starts everything, prints the
# URLs and stops everything on Ctrl-C.  `make run` keeps its FileStorage.
INSTANCES ?= 2
# WORKERS streamguard-worker processes (run_on="worker"), ZEO clients like the
# instances, and Redis on REDIS_PORT as their broker (a new password every run,
# in the rendered configurations only).  One by default, so that worker jobs
# run on the cluster as they would in production; WORKERS=0 starts neither.
WORKERS ?= 1
REDIS_PORT ?= 8101
ZEO_PORT ?= 8100
CLUSTER := $(CURDIR)/cluster$(SUFFIX)
CLUSTER_ARGS = --bin $(BIN) --directory $(CLUSTER) --var $(VAR) --host $(HOST) \
	--port $(PORT) --instances $(INSTANCES) --zeo-port $(ZEO_PORT) --threads $(THREADS) \
	--workers $(WORKERS) --redis-port $(REDIS_PORT)
ifeq ($(PLONE),6.1)
cluster test-cluster: export AUTOINCLUDE_ALLOW_MODULE_NOT_FOUND_ERROR := 1
endif
cluster: $(VENV)/.installed-cluster cluster-packages
	$(BIN)/python scripts/cluster.py $(CLUSTER_ARGS)

# make cluster from start to answer, on its own ports and data (CI runs it).
CHECK_CLUSTER_DIR := $(CURDIR)/.check-cluster$(SUFFIX)
test-cluster: $(VENV)/.installed-cluster cluster-packages
	rm -rf $(CHECK_CLUSTER_DIR)
	$(BIN)/python scripts/cluster.py --bin $(BIN) --directory $(CHECK_CLUSTER_DIR)/cluster \
	  --var $(CHECK_CLUSTER_DIR)/var --host 127.0.0.1 --port 0 --instances 2 --zeo-port 0 \
	  --threads 2 --workers 1 --redis-port 0 --check
	rm -rf $(CHECK_CLUSTER_DIR)

# The lint tools, where they were installed, are kept at their pins too:
# the check below compares every installed package with the pins.
test: install-test $(if $(wildcard $(VENV)/.installed-lint),$(VENV)/.installed-lint)
	$(BIN)/python scripts/pins.py check --plone $(PLONE) --installed
	STREAMGUARD_PLONE=$(PLONE) $(BIN)/zope-testrunner --test-path=src --path=tests --auto-color --auto-progress $(TESTOPTS)

# The buildout route of README.rst, run as written, then a check that its
# instance answers HTTP.
buildout:
	bash scripts/check_buildout.sh

test-buildout: buildout

# Regenerate the pins of PLONE from constraints$(SUFFIX).in in a throw-away
# venv.
PINS_VENV := $(CURDIR)/.pins-venv$(SUFFIX)
pins:
	rm -rf $(PINS_VENV)
	$(PYTHON) -m venv $(PINS_VENV)
	$(PINS_VENV)/bin/pip install -q -U pip setuptools wheel
	$(PINS_VENV)/bin/pip install -q -r constraints$(SUFFIX).in
	$(PINS_VENV)/bin/pip freeze | $(PYTHON) scripts/pins.py write --plone $(PLONE)
	$(PYTHON) scripts/pins.py check --plone $(PLONE)
	rm -rf $(PINS_VENV)

# The tools of `make lint`, `make format` and CI (towncrier), pinned.
$(VENV)/.installed-lint: $(BIN)/python $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) ruff zpretty towncrier vermin
	@touch $@

PYTHON_DIRS := src tests scripts benchmarks
# zpretty formats ZCML and the GenericSetup profiles in its ZCML style (-z:
# one attribute per line, as the profiles are written), page templates as
# HTML.
ZCML_FILES = $(shell find src -name '*.zcml' -o -path '*/profiles/*.xml' | sort)
TEMPLATE_FILES = $(shell find src -name '*.pt' | sort)

# The oldest Python of the supported Plone releases (6.1: 3.10 to 3.13;
# 6.2: 3.10 and later).  The suite runs on 3.11 only; for 3.10 the code is
# checked statically: ruff (target-version in pyproject.toml) for syntax,
# vermin for the standard library (modules, functions, arguments).
OLDEST_PYTHON := 3.10
lint: $(VENV)/.installed-lint
	$(BIN)/ruff check $(PYTHON_DIRS)
	$(BIN)/vermin --quiet --no-tips --violations --eval-annotations -t=$(OLDEST_PYTHON)- $(PYTHON_DIRS)
	$(BIN)/ruff format --check $(PYTHON_DIRS)
	$(BIN)/zpretty --check -z $(ZCML_FILES)
	$(BIN)/zpretty --check $(TEMPLATE_FILES)

format: $(VENV)/.installed-lint
	$(BIN)/ruff format $(PYTHON_DIRS)
	$(BIN)/zpretty -i -z $(ZCML_FILES)
	$(BIN)/zpretty -i $(TEMPLATE_FILES)

# The translation template of the collective.streamguard domain, from the
# Python code (_ of interfaces.py), the templates, the ZCML and the profiles.
LOCALES := src/collective/streamguard/locales
$(VENV)/.installed-i18n: $(BIN)/python $(CONSTRAINTS)
	$(PIP) install -c $(CONSTRAINTS) i18ndude
	@touch $@

i18n: $(VENV)/.installed-i18n
	$(BIN)/i18ndude rebuild-pot --pot $(LOCALES)/collective.streamguard.pot \
	  --create collective.streamguard src/collective/streamguard

clean:
	rm -rf $(VENV) $(INSTANCE) $(CLUSTER) src/*.egg-info
