"""Comparison table (markdown + CSV) and plots of one or more sweeps; see sim/reporting/aggregate.py.

    python scripts/aggregate.py multirun/2026-11-22/10-00-00 [more dirs] --out docs/results/headline [--ignore KEY]

Writes OUT/comparison.md, OUT/comparison.csv, OUT/plots/final_accuracy.png and
OUT/plots/accuracy_vs_round.png, and prints the markdown table. `mhd-sim-report SWEEP_DIR`
writes the same files plus a report page for the sweep and for each of its runs.
"""

from sim.reporting.aggregate import main

if __name__ == "__main__":
    main()
