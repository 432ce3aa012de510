"""``python -m builder``: a Ctrl-C at any moment is one line and exit 130.

builder/__init__.py catches SIGINT from its first line while the imports run; here the CLI takes over
(KeyboardInterrupt unwinds every context manager: VMs stopped, gateway closed, staging removed), and once it has
returned the early handler covers interpreter shutdown again.
"""

import signal
import sys

from . import _interrupted_early

_early = signal.getsignal(signal.SIGINT) is _interrupted_early


def _run() -> int:
    try:
        from .cli import main

        if _early:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        code = main()
    except KeyboardInterrupt:
        code = 130
        sys.stderr.write("interrupted\n")
    if _early:
        signal.signal(signal.SIGINT, _interrupted_early)
    return code


raise SystemExit(_run())
