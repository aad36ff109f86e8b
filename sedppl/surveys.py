"""Survey constants: wavelength grids and filter sets (numpy only, cheap to import).

DESI coadds: 3600-9824 A in 0.8 A steps, vacuum; Legacy Surveys photometry in
DECam g, r, z (south, PHOTSYS "S") or BASS g, r + MzLS z (north, "N"), with
WISE W1, W2. SDSS: ugriz (speclite's ``sdss2010`` curves).
"""

import numpy as np

#: DESI's coadded wavelength grid, vacuum Angstrom.
DESI_WAVE = np.arange(3600.0, 9824.0 + 0.4, 0.8)
#: Legacy Surveys south (DECam) bands with WISE: the zoo's default.
DESI_BANDS = ["decam_g", "decam_r", "decam_z", "wise_w1", "wise_w2"]
#: Legacy Surveys north (BASS/MzLS) bands with WISE.
DESI_BANDS_NORTH = ["bass_g", "bass_r", "mzls_z", "wise_w1", "wise_w2"]
#: SDSS imaging bands.
SDSS_BANDS = ["sdss_u", "sdss_g", "sdss_r", "sdss_i", "sdss_z"]
