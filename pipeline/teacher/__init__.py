"""The teacher: its directory, what it contributes per position (signals), and the one capture."""
