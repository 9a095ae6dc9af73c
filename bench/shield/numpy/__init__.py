"""Hides the bench's numpy (pulled in by matplotlib) from the servers under test.

sqlite-utils imports numpy when it can, which would add ~15 MB to the service's
memory in the bench but not in production, where numpy is not installed. The
bench puts bench/shield first on the servers' PYTHONPATH; sqlite-utils treats
this ImportError as "numpy absent", exactly as in production.
"""

raise ImportError("numpy is hidden from the servers under test (bench/shield)")
