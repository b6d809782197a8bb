# SPDX-License-Identifier: GPL-2.0-or-later
"""Frame-level fuzzing of the receiver: thousands of damaged, truncated
and forged frames, each to a fresh receiver protected by recorded
checkpoints (see curling_fuzz.py).

``CURLING_SEED`` replays a run's choices (logged); ``CURLING_FUZZ_SESSIONS``
sets how many spoiled frames are sent (default 6,000 in CI; a soak sets
more).
"""

from __future__ import annotations

import json
import os
import time

from curling_fuzz import MUTATIONS, Fuzzer, record
from curling_test import CurlingTest

#: Spoiled frames sent, one per receiver.
SESSIONS = int(os.environ.get("CURLING_FUZZ_SESSIONS", "6000"))


class CurlingFuzz(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,input,fuzz
    """

    timeout = 1800

    def test_spoiled_frames(self) -> None:
        """Every spoiled frame ends as its kind allows: a damaged one in
        an error with the last good checkpoint kept and no failover, a
        truncated one in a failover from the last whole checkpoint, a
        forged one (checksums made to match) however the receiver judges
        it; never a crash, never a hang."""
        seed, _ = self.seeded_rng()
        assert self._tmpdir is not None
        rec = record(str(self.qemu_bin), self._tmpdir, log=self.log)
        fuzzer = Fuzzer(str(self.qemu_bin), rec, self._tmpdir, seed,
                        log=self.log)
        start = time.monotonic()
        fuzzer.run(SESSIONS)
        took = time.monotonic() - start
        counts = fuzzer.counts()
        self.log.info("seed %d: %d spoiled frames in %.0f s: %s", seed,
                      len(fuzzer.sessions), took, json.dumps(counts))
        self.whiteboard = json.dumps({"seed": seed,
                                      "sessions": len(fuzzer.sessions),
                                      "seconds": round(took),
                                      "counts": counts})
        for session in fuzzer.failures:
            self.log.error("seed %d: %s", seed, session)
        self.assertEqual(fuzzer.failures, [],
                         f"seed {seed}: {len(fuzzer.failures)} sessions "
                         f"failed; the first: {fuzzer.failures[:1]}")
        self.assertEqual(len(fuzzer.sessions), SESSIONS)
        # Each kind was tried, and each ended at least once as expected.
        for name in MUTATIONS:
            self.assertTrue(any(key.startswith(name + "/")
                                for key in counts), f"no {name} frame sent")
        self.assertTrue(counts.get("truncated/failover-k"),
                        "no truncated frame led to a failover")
        self.assertTrue(counts.get("bit-flips/error"),
                        "no damaged frame was refused")
