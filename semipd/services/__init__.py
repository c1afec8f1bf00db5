"""semipd's processes, one package per role (controller, prefill, decode, unified, scm, gateway),
and worker.py, what every worker role shares."""
