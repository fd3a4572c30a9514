"""`tprl data import`: benchmarks from LLaVA's evaluation files or lmms-lab's Parquet, one module each."""
