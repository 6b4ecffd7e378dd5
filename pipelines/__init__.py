"""pipelines: the data stages on Ray Data and the catalog they share."""
