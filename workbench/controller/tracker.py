"""When a GPU's exec stream (or its PCIe link) becomes free: Clockwork's `WorkerTracker` (clockwork.md §4.6).

A timeline holds the jobs sent to one stream, in the order they were sent (which is the order the worker
runs them: it orders by `earliest`, and we send with increasing `earliest`). `available(now)` is when the
last of them is predicted to end. Every result re-anchors the timeline at the observed end time of that job,
so prediction errors do not accumulate; an error result removes the job without moving time.
"""
from __future__ import annotations


class Timeline:
    """Predicted work on one stream. Durations are ns; times are the controller's clock."""
    __slots__ = ("jobs", "total", "work_begin", "future", "lag")

    def __init__(self, future: int = 1_000_000, lag: int = 10_000_000):
        self.jobs: dict[int, int] = {}    # action id -> predicted duration (ns), in send order
        self.total = 0                    # sum of predicted durations of `jobs`
        self.work_begin = 0               # when the head job began (or is predicted to begin)
        self.future = future              # nothing can start sooner than now + future (send latency)
        self.lag = lag                    # a head overdue by more than this is assumed to be ending now - lag

    def available(self, now: int) -> int:
        """When the stream is predicted to be free: the end of the last job, never before now + future."""
        jobs = self.jobs
        if jobs:
            head = next(iter(jobs.values()))
            if now - (self.work_begin + head) > self.lag:   # head overdue: do not let it block the plan
                self.work_begin = now - self.lag - head
            t = self.work_begin + self.total
            f = now + self.future
            return t if t > f else f
        t = self.work_begin
        f = now + self.future
        return t if t > f else f

    def head_end(self) -> int:
        """When the oldest job is predicted to end (its result is the next one due); 0 if none."""
        jobs = self.jobs
        return self.work_begin + next(iter(jobs.values())) if jobs else 0

    def add(self, action_id: int, duration: int, begin: int) -> None:
        """Append a job predicted to begin at `begin` (= available(now) when it was planned)."""
        if not self.jobs:
            self.work_begin = begin
        self.jobs[action_id] = duration
        self.total += duration

    def backlog(self, now: int) -> int:
        """Predicted work not yet done, in ns from now."""
        return self.available(now) - now

    def success(self, action_id: int, end: int) -> bool:
        """The job ended at `end`. Jobs sent before it are done too (one stream runs in order): drop them
        and re-anchor at `end`. Returns False if the job was unknown (already removed)."""
        jobs = self.jobs
        if action_id not in jobs:
            return False
        if next(iter(jobs)) == action_id:      # the usual case: the head finished
            self.total -= jobs.pop(action_id)
            self.work_begin = end
            return True
        for aid in list(jobs):
            self.total -= jobs.pop(aid)
            if aid == action_id:
                break
        self.work_begin = end
        return True

    def error(self, action_id: int) -> bool:
        """The job did not run: remove it without moving time."""
        d = self.jobs.pop(action_id, None)
        if d is None:
            return False
        self.total -= d
        return True

    def __len__(self) -> int:
        return len(self.jobs)
