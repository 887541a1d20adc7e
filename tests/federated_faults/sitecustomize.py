"""Fault injection for one SuperNode of the deployment test (on its PYTHONPATH only).

KEYBOARD_TEST_FAULT=hang: the node hangs while training (and writes KEYBOARD_TEST_MARKER), so
the test can kill it mid-round. =corrupt: the node sends a malformed masked update: NaN floats
in round 1, a wrong shape in round 2, an oversized array after that (each ClientApp call is a
new process, so the round number comes from the message).
"""

import os
import time
from pathlib import Path

FAULT = os.environ.get("KEYBOARD_TEST_FAULT", "")

if FAULT:
    import flwr.client.mod as mods
    import numpy as np
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    original = mods.secaggplus_mod

    def faulty_secaggplus_mod(msg, ctxt, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if FAULT == "hang" and stage == "collect_masked_vectors":
            Path(os.environ["KEYBOARD_TEST_MARKER"]).write_text(str(os.getpid()))
            time.sleep(3600)
        out = original(msg, ctxt, call_next)
        if FAULT == "corrupt" and stage == "collect_masked_vectors" and out.has_content():
            record = out.content.config_records[RECORD_KEY_CONFIGS]
            arrays = [bytes_to_ndarray(b) for b in record[Key.MASKED_PARAMETERS]]
            server_round = int(msg.metadata.group_id or 1)
            kind = ("nan", "shape", "oversized")[min(server_round, 3) - 1]
            if kind == "nan":
                arrays = [np.full(a.shape, np.nan) for a in arrays]
            elif kind == "shape":
                arrays[-1] = arrays[-1].reshape(-1)[:-1]
            else:
                arrays.append(np.zeros(5_000_000, dtype=np.int64))
            record[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a) for a in arrays]
        return out

    mods.secaggplus_mod = faulty_secaggplus_mod
