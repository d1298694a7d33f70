"""Stopping the processes the runner and its pytest plugin start (a redis-server, our worker)."""

import subprocess


def stop(process: subprocess.Popen, grace: float) -> None:
    """Asks ``process`` to end (SIGTERM), and kills it if it has not within ``grace`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
