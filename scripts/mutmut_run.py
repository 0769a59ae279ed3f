"""``mutmut run`` with one fix to its ``max_stack_depth`` option (pyproject.toml), and each
mutant's tests run fastest first.

mutmut 3.8.1 counts the frames of cbp code between a mutated function and the test by resolving
every frame's file strictly, so a frame with no file stops the run (``<frozen importlib._bootstrap>``
at import) or drops the call (``<string>``: a dataclass's generated ``__init__`` calling
``__post_init__``). Here such frames are skipped, as frames outside cbp are, and the count is the
same as mutmut's otherwise.

mutmut hands pytest a mutant's tests in set order (random from one run to the next) and stops at
the first failure (``-x``); here they go in the order of their recorded durations, so a mutant a
unit test kills is not first put through the end-to-end runs that also reach it. Which mutants
die does not change, only how soon.
"""

import inspect
from pathlib import Path

import mutmut.mutation.trampoline as trampoline
import mutmut.stats as stats
import mutmut.workers.isolation as isolation
from mutmut.__main__ import cli
from mutmut.configuration import config
from mutmut.state import state

_record = stats.record_trampoline_hit


def _deeper_than_limit() -> bool:
    sources = config().resolved_mutated_source_paths
    left, frame = config().max_stack_depth, inspect.currentframe()
    while left and frame:
        filename, frame = frame.f_code.co_filename, frame.f_back
        if any(runner in filename for runner in ("pytest", "hammett", "unittest")):
            break
        if filename.startswith("<"):
            continue
        path = Path(filename).resolve()
        if any(source in path.parents for source in sources):
            left -= 1
    return not left


def record_trampoline_hit(name: str, caller: str | None = None) -> None:
    cfg = config()
    if cfg.max_stack_depth == -1:
        return _record(name, caller)
    if _deeper_than_limit():
        return None
    limit, cfg.max_stack_depth = cfg.max_stack_depth, -1   # the depth is checked: record it
    try:
        return _record(name, caller)
    finally:
        cfg.max_stack_depth = limit


stats.record_trampoline_hit = trampoline.record_trampoline_hit = record_trampoline_hit


def _fastest_first(submit):
    def submit_sorted(self, mutant_name: str, tests: list[str], *args, **kwargs):
        durations = state().duration_by_test
        return submit(self, mutant_name, sorted(tests, key=lambda test: (durations.get(test, 0.0), test)),
                      *args, **kwargs)
    return submit_sorted


for _runner in (isolation.ForkServerRunner, isolation.ForkRunner):
    _runner.submit = _fastest_first(_runner.submit)

if __name__ == "__main__":
    cli()
