"""The image drivers (qcow2, qcow v1, raw) behind one BlockDevice interface."""
