"""Search code in the style of AutoDL-Projects (xautodl) and NAS-Bench-201, written here for the tests.

``cell_operations`` holds the candidates (``OPS``: ``Zero``, ``Identity``,
``POOLING`` without batch norm, ``ReLUConvBN`` and ``SepConv`` whose convolutions
carry a bias when the batch norm is not affine, ``FactorizedReduce`` with its
padding); ``search_cells`` the NAS-Bench-201 cell (edges a ``ModuleDict`` of
``ModuleList``s keyed ``"i<-j"``, every edge's candidates summed inline in the
cell's ``forward``, a GDAS hard-sample ``forward_gdas``) and the NASNet-space
cell whose mixed ops sum in ``forward_darts`` and pick in ``forward_gdas``;
``search_models`` the networks that call them.
"""
