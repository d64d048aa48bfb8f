"""`python -m gru_lm`: the command line (and how torchrun and `--nproc` start each process)."""

from gru_lm.utils import record_signals_early


def run() -> None:
    record_signals_early()  # before the heavy imports: a Ctrl-C there is not a traceback
    from gru_lm.cli import main

    main()


run()
