"""The exit codes of the project's commands, one list: the worker (``python -m pipeline.train``), the
launchers (``pipeline/launch.py``, ``pipeline/study.py``) and the stage tools (``pipeline/groups.py`` ...).
"""
EXIT_OK = 0
EXIT_USAGE = 2  # bad input (a config key, a flag, a file): one line naming it and the fix; nothing started
EXIT_PREEMPTED = 3  # the worker stopped on request after writing a resumable checkpoint (SIGUSR2 / SIGTERM)
EXIT_NONFINITE = 4  # the worker stopped on a non-finite loss
# a rank made no training progress for train.hang_timeout_s (pipeline/train/watchdog.py): not the user's fault,
# a restarter may requeue it; every rank that sees the hang exits with it at once, from its watchdog thread
EXIT_HUNG = 5

# the worker's exits that every rank takes together: a local launcher does not stop the other workers for them
ORDERLY_EXITS = (EXIT_OK, EXIT_USAGE, EXIT_PREEMPTED, EXIT_NONFINITE)
