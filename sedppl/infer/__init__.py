"""Inference engines: NUTS (:mod:`.nuts`) and amortized neural posterior estimation (:mod:`.npe`)."""
