#!/usr/bin/env bash
# Fit the real spectra shipped with ppxf (SDSS DR18: NGC 3073, NGC 3522) and specutils (DESI coadds)
# with the shipped DESI-like spectrum posterior (and, with NUTS=1, NUTS on NGC 3073 and NGC 3522 for
# comparison). Outputs in ${OUT:-runs/real}; docs/figures/desi_39627866878514741.png is one of its figures.
#
#   bash examples/real_spectra.sh            # NPE only: 61 s on 2 cores (2026-11-26)
#   NUTS=1 bash examples/real_spectra.sh     # + NUTS: slow (one chain of 10 + 10 on NGC 3073 took 694 s)
set -euo pipefail
OUT=${OUT:-runs/real}
PPXF=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('ppxf').origin))")
SPECUTILS=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('specutils').origin))")
DESI=$SPECUTILS/io/default_loaders/tests/desi_test_data
mkdir -p "$OUT"
for g in NGC3073 NGC3522; do
  sedppl fit "$PPXF/spectra/${g}_SDSS_DR18.fits" --model specphot --out "$OUT/$g" --plots 1 || [ $? -eq 3 ]
done
for f in coadd-sv3-dark-26065 coadd-5-169-thru20210419; do
  sedppl fit "$DESI/$f.fits" --model specphot --out "$OUT/$f" --plots 3 || [ $? -eq 3 ]
done
python - "$OUT" <<'PY'
import sys
from pathlib import Path
from astropy.table import Table, vstack
out = Path(sys.argv[1])
cols = ["name", "log_stellar_mass_p16", "log_stellar_mass_p50", "log_stellar_mass_p84", "log_ssfr_100myr_p50",
        "mass_weighted_age_p50", "mass_weighted_log_z_p50", "tau_ism_p50", "sigma_v_p50", "chi2_dof", "ood"]
t = vstack([Table.read(p)[cols] for p in sorted(out.glob("*/summary.ecsv"))])
t.write(out / "real_summary.ecsv", overwrite=True)
t.pprint(max_width=200)
PY
if [ "${NUTS:-0}" = 1 ]; then
  for g in NGC3073 NGC3522; do
    sedppl compare "$PPXF/spectra/${g}_SDSS_DR18.fits" --model specphot --draws 100 --warmup 100 --chains 1 \
      --out "$OUT/compare_$g"
  done
fi
