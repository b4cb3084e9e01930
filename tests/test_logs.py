"""Console progress of long loops: a few lines with an ETA, none for a short loop, rank 0 only."""

import logging

from rdrop import logs


class FakeClock:
    def __init__(self, seconds_per_item):
        self.now, self.step = 0.0, seconds_per_item

    def __call__(self):
        return self.now

    def tick(self):
        self.now += self.step


def run_loop(items, seconds_per_item, show=True):
    clock = FakeClock(seconds_per_item)
    progress = logs.Progress("evaluating: batch", items, show=show, clock=clock)
    for done in range(1, items + 1):
        clock.tick()
        progress.update(done)


def test_a_long_loop_reports_every_few_seconds_with_an_eta_and_at_the_end(caplog):
    with caplog.at_level(logging.INFO, logger="rdrop.logs"):
        run_loop(items=40, seconds_per_item=2.0)  # 80 s: reports at 6 s, then every 15 s, and at the end
    lines = [record.getMessage() for record in caplog.records]
    done_at = [3, 11, 19, 27, 35, 40]
    assert len(lines) == len(done_at)
    for line, done in zip(lines, done_at):
        remaining_seconds = int((40 - done) * 2.0)
        assert line.startswith(f"evaluating: batch {done}/40,")
        assert line.endswith(f"eta {remaining_seconds // 60}:{remaining_seconds % 60:02d}")


def test_a_short_loop_and_other_ranks_say_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="rdrop.logs"):
        run_loop(items=100, seconds_per_item=0.04)  # 4 s in all
        run_loop(items=40, seconds_per_item=2.0, show=False)
    assert caplog.records == []
