"""The ``fastvit`` command line tools (bench, predict, train); they import ``vit``, never the reverse."""
