"""The child process of the peak-RSS and Torch-Pruning measurements: ``python -m resp_core.bench SPEC``
prints one JSON line (:func:`resp_core.bench.child._child_main`)."""

import json
import sys

from resp_core.bench.child import _child_main

print(json.dumps(_child_main(json.loads(sys.argv[1]))))
