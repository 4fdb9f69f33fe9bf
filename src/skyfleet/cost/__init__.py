"""Cost: the instance catalog, replica prices, metering, attribution, budgets, reports and advice."""
