"""Circuit atlas of a whole network: every unit's smallest faithful circuit, mapped on Ray,
stored as Parquet, queried with SQL and browsed offline (``netcarve atlas``)."""

from netcarve.atlas.query import QueryResult, atlas_query
from netcarve.atlas.run import AtlasRun, run_atlas, select_units
from netcarve.atlas.store import AtlasError, AtlasStore
from netcarve.atlas.unit import AtlasConfig

__all__ = ["AtlasConfig", "AtlasError", "AtlasRun", "AtlasStore", "QueryResult",
           "atlas_query", "run_atlas", "select_units"]
