import os

# Ray must bind and connect on loopback only (see README, "Network").
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import torch  # noqa: E402

# Two cores here: keep torch from oversubscribing them when Ray workers run beside the test.
torch.set_num_threads(1)
