from semipd.services.decode.worker import run
from semipd.services.worker import worker_main

worker_main("decode", run)
