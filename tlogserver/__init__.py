"""tlogserver: the tlog daemon (`python -m tlogserver`, the ``tlogserver`` command)."""

# The library first: it installs the switch between compiled and pure-Python modules
# (tlog.compiled) before any module of this package is found.
import tlog  # noqa: F401
