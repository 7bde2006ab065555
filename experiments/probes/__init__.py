"""Scripts that answer one question each, kept while the question is open or another script
uses them (transfers: bench.speedup --probe)."""
