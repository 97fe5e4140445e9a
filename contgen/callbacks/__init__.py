"""Lightning callbacks: sample grids, throughput."""
