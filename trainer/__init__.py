"""The trainer role: draft strategies, the step stream, checkpoints, export, the service."""

STATUS_FILE = "trainer-status.json"
"""Written to ``--out`` when training ends: the last step's GetStatus, for those who missed it."""
