"""Many takers of one workdir lock at once (threads: each opens the lock itself, so their
flocks and bucket preconditions conflict as those of separate processes do)."""

import threading

from mythos_jax.train.workdir_lock import WorkdirBusy, WorkdirLock


def race_for_the_lock(workdir: str, takers: int) -> list[WorkdirLock]:
    """Start ``takers`` acquisitions of ``workdir``'s lock together; the locks that were won
    (still held: release them)."""
    start, won = threading.Barrier(takers), []

    def take():
        lock = WorkdirLock(workdir)
        start.wait()
        try:
            lock.acquire()
            won.append(lock)
        except WorkdirBusy:
            pass

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return won
