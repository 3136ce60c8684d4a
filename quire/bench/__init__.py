"""``quire bench``: a seeded load generator for OpenAI-compatible servers and the offline engine.

``workload`` builds the prompts and arrival times, ``client`` streams requests and times them,
``stats`` turns per-request records into per-level aggregates, ``report`` prints and saves them, and
``plot`` (needs matplotlib, the ``bench`` extra) draws saved runs side by side.
"""

from __future__ import annotations
