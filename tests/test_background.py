"""The capture's background writer: jobs in order, a bounded queue, a job's error raised in the caller."""

import threading
import time

import pytest

from pipeline.teacher.background import BackgroundJobs


@pytest.mark.parametrize("threads", [0, 1])
def test_jobs_run_in_submission_order(threads):
    done = []
    with BackgroundJobs(depth=2, threads=threads) as jobs:
        for i in range(20):
            jobs.submit(lambda i=i: done.append(i))
    assert done == list(range(20))


def test_the_queue_is_bounded():
    release, started, done = threading.Event(), threading.Event(), []
    jobs = BackgroundJobs(depth=2)
    jobs.submit(lambda: (started.set(), release.wait()))
    started.wait()
    for i in range(2):  # fills the queue behind the running job
        jobs.submit(lambda i=i: done.append(i))
    blocked = threading.Thread(target=jobs.submit, args=(lambda: done.append(2),))
    blocked.start()
    blocked.join(0.3)
    assert blocked.is_alive() and done == []  # the third waits for room
    release.set()
    blocked.join()
    jobs.close()
    assert done == [0, 1, 2]


def test_a_failed_job_stops_later_jobs_and_is_raised_at_the_next_submit():
    done = []
    jobs = BackgroundJobs(depth=1)
    with pytest.raises(ZeroDivisionError):
        jobs.submit(lambda: 1 / 0)
        for _ in range(100):  # raised at a submit once the thread has failed; the jobs queued till then never run
            time.sleep(0.01)
            jobs.submit(lambda: done.append("later"))
    with pytest.raises(ZeroDivisionError):
        jobs.close()
    assert done == []


def test_a_failure_while_the_caller_waits_for_room_is_raised_promptly():
    release = threading.Event()

    def fail():
        release.wait()
        raise OSError("disk full")

    jobs = BackgroundJobs(depth=1)
    jobs.submit(fail)
    jobs.submit(lambda: None)  # the queue is now full
    threading.Timer(0.2, release.set).start()
    with pytest.raises(OSError, match="disk full"):
        jobs.submit(lambda: None)  # blocked on a full queue when the job fails


def test_an_error_in_the_caller_lets_queued_jobs_finish_and_passes_through():
    done = []
    with pytest.raises(KeyError):
        with BackgroundJobs(depth=2) as jobs:
            jobs.submit(lambda: (time.sleep(0.1), done.append("written")))
            raise KeyError("forward failed")
    assert done == ["written"]
