"""A download's signals: its run's steps post the calls on the loop, and a
signal worker (``_Signals``) makes each run's calls in the order posted,
one at a time, every one of them, whatever the loop and the workers do
meanwhile."""
import collections
import threading

import bitpit


def test_a_call_posted_as_the_worker_empties_the_runs_queue_is_still_made():
    """The loop posts a call while the run still has one to make, and its
    thread is switched out before the call is in the run's queue: meanwhile
    the worker makes the one left, finds the queue empty and lets the run
    go. The call posted must still be handed to a worker, and made (else
    the run's later calls, its ``_end_run`` too, wait for ever)."""
    signals = bitpit._Signals()
    run = bitpit._Run()
    inside, go = threading.Event(), threading.Event()
    made = []

    class SwitchedOut(collections.deque):
        """The run's queue, whose next append comes after the worker is done."""
        armed = False

        def append(self, item):
            if self.armed:
                self.armed = False
                go.set()  # the worker makes 'first', finds none left, lets the run go
                assert bitpit._WORKERS.wait_quiet(5)
            super().append(item)

    def hold():
        inside.set()
        go.wait(5)

    run.calls = SwitchedOut()
    signals.post(run, hold)
    signals.post(run, made.append, 'first')
    signals.hand()
    assert inside.wait(5)  # the worker makes hold(); 'first' waits in the queue
    run.calls.armed = True
    signals.post(run, made.append, 'second')  # (the loop sees 'first' still there)
    signals.hand()
    assert bitpit._WORKERS.wait_quiet(5)
    assert made == ['first', 'second']
