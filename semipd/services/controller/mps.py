"""NVIDIA MPS: finding a running control daemon, or starting and stopping our own.

Every process of the server (controller, workers, standbys) must reach the same daemon, so the
two variables that locate it, CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY, are set in the
controller's environment, which the workers inherit. All of this happens before the controller
creates its CUDA context: a process joins MPS (or not) when its context is created.
"""

import os
import shutil
import subprocess
import time

from semipd.shared.errors import UserError

CONTROL = "nvidia-cuda-mps-control"


def _control(command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CONTROL], input=command + "\n", capture_output=True, text=True, timeout=10, env=env)


def _locations(folder: str) -> dict[str, str]:
    """The variables that point MPS clients and the control tool at a daemon in `folder`."""
    return {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(folder, "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": os.path.join(folder, "log")}


def daemon_running(env: dict | None = None) -> bool:
    """True if an MPS control daemon answers at the pipe directory of env (default: this
    process's environment)."""
    if shutil.which(CONTROL) is None:
        return False
    try:
        return _control("get_server_list", env).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _send_quit(env: dict | None = None) -> None:
    """Ask a daemon to quit, without waiting: it quits once its last client is gone."""
    try:
        control = subprocess.Popen([CONTROL], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, text=True, start_new_session=True, env=env)
        control.stdin.write("quit\n")
        control.stdin.close()
    except OSError:
        pass


class MpsDaemon:
    """An MPS control daemon of our own, with its pipes and logs in `folder`."""

    def __init__(self, folder: str):
        if shutil.which(CONTROL) is None:
            raise UserError(f"--start-mps: {CONTROL} is not on the PATH")
        for var, path in _locations(folder).items():
            os.environ[var] = path
            os.makedirs(path, mode=0o700, exist_ok=True)
        result = subprocess.run([CONTROL, "-d"], capture_output=True, text=True, timeout=30)
        deadline = time.monotonic() + 10
        while not daemon_running():
            if result.returncode != 0 or time.monotonic() > deadline:
                raise UserError(f"--start-mps: the MPS daemon did not start ({result.stderr.strip() or 'no answer'}); "
                                f"see {os.environ['CUDA_MPS_LOG_DIRECTORY']}/control.log")
            time.sleep(0.1)

    def stop(self) -> None:
        """Ask the daemon to quit: the controller itself is its client until it exits, so waiting
        here would only run out the stop's bound."""
        _send_quit()


def stop_left_daemon(folder: str) -> bool:
    """Ask the daemon with its pipes in `folder`, left by a server that is gone, to quit; once
    none answers there (at a later call, if one is quitting now), remove the folder, so that a
    daemon is never cut off from its pipes. Whether one was asked."""
    env = os.environ | _locations(folder)
    if daemon_running(env):
        _send_quit(env)
        return True
    shutil.rmtree(folder, ignore_errors=True)
    return False
