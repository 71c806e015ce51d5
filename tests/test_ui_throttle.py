"""The redraw throttle, on a fake clock."""

from peft_magic.ui.throttle import Throttle


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_at_most_n_per_second():
    clock = FakeClock()
    throttle = Throttle(max_per_second=4, clock=clock)
    granted = 0
    for _ in range(1000):  # 10 s of events at 100 per second
        granted += throttle.ready()
        clock.now += 0.01
    assert granted == 40


def test_first_call_and_forced_calls_always_pass():
    clock = FakeClock()
    throttle = Throttle(max_per_second=2, clock=clock)
    assert throttle.ready()
    assert not throttle.ready()
    assert throttle.ready(force=True)
    clock.now += 0.49
    assert not throttle.ready()  # the forced redraw restarted the interval
    clock.now += 0.02
    assert throttle.ready()


def test_no_limit():
    throttle = Throttle(max_per_second=0, clock=FakeClock())
    assert all(throttle.ready() for _ in range(10))
