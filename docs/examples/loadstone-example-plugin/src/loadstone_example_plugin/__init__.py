"""An example loadstone plugin distribution, written as a third-party author would.

Three plugins, one entry point each (see pyproject.toml):

* ``example-catalog`` (:mod:`.catalog`): a resolver for ``catalog://NAME`` references, looked
  up in the catalog file named by ``LOADSTONE_CATALOG``.
* ``example-audit`` (:mod:`.audit`): lifecycle hooks appending one JSON line per load, or per
  failed load, to the file named by ``LOADSTONE_AUDIT_LOG``.
* ``example-placement`` (:mod:`.placement`): the ``memory-fraction[:F]`` placement strategy,
  ``auto`` placement inside a fraction of each device's memory budget.

Importing this package is cheap: torch is never imported here.
"""

__version__ = "0.1.0"
