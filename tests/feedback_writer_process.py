"""A feedback writer run as a subprocess by tests/test_feedback_log.py (durability, multi-process).

Appends ``--count`` events (forever if 0) in batches of ``--batch`` and, only after ``append``
has returned, prints ``ACK <event_id>`` for every event of the batch (stored or duplicate: either
way the log holds it), flushing stdout so the parent sees exactly what was acknowledged. Ends with
``DONE <accepted> <duplicates>``.

Event ids are ``<prefix>-<i>``; with ``--shared N`` each batch also carries ``shared-<j>`` ids,
``j`` cycling through ``0..N-1``, which two writers then race to store. With ``--wait`` it prints
``READY`` once the log is open and waits for a line on stdin, so that writers start together;
``--pause-s`` leaves the gap between appends that real request traffic has (SQLite's lock is not
fair: a writer in a tight loop re-takes it before a waiting one wakes from its busy sleep).

    python tests/feedback_writer_process.py --path LOG --prefix a --count 100 --batch 5
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from pipeline.feedback_log import FeedbackLog, FeedbackLogConfig


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--count", type=int, default=0, help="events to write; 0: until killed")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--shared", type=int, default=0, help="ids shared with other writers")
    parser.add_argument("--synchronous", default="FULL")
    parser.add_argument("--pause-s", type=float, default=0.0, help="sleep between appends")
    parser.add_argument("--wait", action="store_true", help="print READY, await a stdin line")
    args = parser.parse_args(argv)

    accepted = duplicates = 0
    shared = itertools.cycle(range(args.shared)) if args.shared else None
    indices = itertools.count() if args.count == 0 else iter(range(args.count))
    config = FeedbackLogConfig(path=args.path, synchronous=args.synchronous)
    with FeedbackLog(config) as log:
        if args.wait:
            print("READY", flush=True)
            sys.stdin.readline()
        while batch_indices := list(itertools.islice(indices, args.batch)):
            ids = [f"{args.prefix}-{i}" for i in batch_indices]
            if shared is not None:
                ids.append(f"shared-{next(shared)}")
            events = [
                log.make_event(e, f"u{n % 7}", f"i{n % 11}", "click") for n, e in enumerate(ids)
            ]
            result = log.append(events)
            accepted += result.accepted
            duplicates += result.duplicates
            sys.stdout.write("".join(f"ACK {e}\n" for e in ids))
            sys.stdout.flush()
            time.sleep(args.pause_s)
    print(f"DONE {accepted} {duplicates}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
