from semipd.services.prefill.worker import run
from semipd.services.worker import worker_main

worker_main("prefill", run)
