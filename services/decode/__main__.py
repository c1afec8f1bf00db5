from services.decode.worker import run
from shared.worker import worker_main

worker_main("decode", run)
