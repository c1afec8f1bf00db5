from services.prefill.worker import run
from shared.worker import worker_main

worker_main("prefill", run)
