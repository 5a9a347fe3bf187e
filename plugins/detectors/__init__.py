"""mmbench's built-in detectors (the detection track): one method per file."""
