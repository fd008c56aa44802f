# Signal handlers first, before the imports of the command line: Ctrl-C at any moment is one line, exit 130.
import sys

from ovsd3.atomic import Interrupts, exit_code_of, ignore_signals, interrupted_line

try:
    # Entered inside the try and never left: a signal while the handlers go in is reported below, and the process
    # ends with them (putting them back would be one more moment a signal escapes as a traceback).
    Interrupts().__enter__()
    from ovsd3.cli import main

    code = main()
    ignore_signals()  # the command has ended and said how: a signal from now on changes nothing
except KeyboardInterrupt as stop:  # while importing the command line, or as main started or returned
    ignore_signals()  # first, so that a second Ctrl-C cannot cut the line short
    # the command is the first word that is not an option (ovsd3's own options are --help and --version)
    print(interrupted_line(next((word for word in sys.argv[1:] if not word.startswith("-")), None), stop),
          file=sys.stderr)
    code = exit_code_of(stop)
# CPython up to 3.13 remembers, process-wide, a KeyboardInterrupt that left code run by exec() or eval() of a string
# (dataclasses and namedtuple build their methods so, while ovsd3 imports), even one caught later, and then ends
# `python -m` by killing itself with SIGINT instead of exiting with `code` (no traceback, exit status -2; fixed
# upstream by gh-128130). An exec() that ends normally forgets it; the signals are ignored by now, so nothing can
# interrupt this one.
exec("pass")
raise SystemExit(code)
