"""Stellar population synthesis: SSP grids, composite populations, remnants and nebular emission."""
