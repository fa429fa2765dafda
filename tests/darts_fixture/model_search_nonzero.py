import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import Variable

from .operations import *
from .genotypes import PRIMITIVES


class MixedOp(nn.Module):
  # Candidates weighted exactly zero (pruned) are not run: no time spent on them, their
  # batch norms keep their statistics, and their weights get no gradient.

  def __init__(self, C, stride):
    super(MixedOp, self).__init__()
    self._ops = nn.ModuleList()
    for primitive in PRIMITIVES:
      op = OPS[primitive](C, stride, False)
      if 'pool' in primitive:
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
      self._ops.append(op)

  def forward(self, x, weights):
    out = 0
    for w, op in zip(weights, self._ops):
      if w == 0:
        continue
      out = out + w * op(x)
    return out


class GeneratorMixedOp(MixedOp):
  # The same in one line, as other forks write it.

  def forward(self, x, weights):
    return sum(w * op(x) for w, op in zip(weights, self._ops) if w != 0)


class Cell(nn.Module):

  def __init__(self, steps, multiplier, C_prev_prev, C_prev, C, reduction, reduction_prev, mixed_op):
    super(Cell, self).__init__()
    self.reduction = reduction
    if reduction_prev:
      self.preprocess0 = FactorizedReduce(C_prev_prev, C, affine=False)
    else:
      self.preprocess0 = ReLUConvBN(C_prev_prev, C, 1, 1, 0, affine=False)
    self.preprocess1 = ReLUConvBN(C_prev, C, 1, 1, 0, affine=False)
    self._steps = steps
    self._multiplier = multiplier
    self._ops = nn.ModuleList()
    for i in range(self._steps):
      for j in range(2+i):
        stride = 2 if reduction and j < 2 else 1
        self._ops.append(mixed_op(C, stride))

  def forward(self, s0, s1, weights):
    s0 = self.preprocess0(s0)
    s1 = self.preprocess1(s1)
    states = [s0, s1]
    offset = 0
    for i in range(self._steps):
      s = sum(self._ops[offset+j](h, weights[offset+j]) for j, h in enumerate(states))
      offset += len(states)
      states.append(s)
    return torch.cat(states[-self._multiplier:], dim=1)


class Network(nn.Module):
  # A search that prunes candidates as it goes: the weights of the pruned ones are
  # masked to exactly zero.

  def __init__(self, C, num_classes, layers, criterion, steps=4, multiplier=4, stem_multiplier=3,
               mixed_op=MixedOp):
    super(Network, self).__init__()
    self._C = C
    self._num_classes = num_classes
    self._layers = layers
    self._criterion = criterion
    self._steps = steps
    self._multiplier = multiplier

    C_curr = stem_multiplier*C
    self.stem = nn.Sequential(
      nn.Conv2d(3, C_curr, 3, padding=1, bias=False),
      nn.BatchNorm2d(C_curr)
    )
    C_prev_prev, C_prev, C_curr = C_curr, C_curr, C
    self.cells = nn.ModuleList()
    reduction_prev = False
    for i in range(layers):
      if i in [layers//3, 2*layers//3]:
        C_curr *= 2
        reduction = True
      else:
        reduction = False
      cell = Cell(steps, multiplier, C_prev_prev, C_prev, C_curr, reduction, reduction_prev, mixed_op)
      reduction_prev = reduction
      self.cells += [cell]
      C_prev_prev, C_prev = C_prev, multiplier*C_curr

    self.global_pooling = nn.AdaptiveAvgPool2d(1)
    self.classifier = nn.Linear(C_prev, num_classes)
    self._initialize_alphas()

  def prune(self, normal, reduce):
    # (edge, candidate) pairs whose weight is zero from now on
    for mask, pairs in ((self.mask_normal, normal), (self.mask_reduce, reduce)):
      for i, k in pairs:
        mask[i, k] = 0

  def forward(self, input):
    s0 = s1 = self.stem(input)
    for i, cell in enumerate(self.cells):
      if cell.reduction:
        weights = F.softmax(self.alphas_reduce, dim=-1) * self.mask_reduce
      else:
        weights = F.softmax(self.alphas_normal, dim=-1) * self.mask_normal
      s0, s1 = s1, cell(s0, s1, weights)
    out = self.global_pooling(s1)
    logits = self.classifier(out.view(out.size(0),-1))
    return logits

  def _loss(self, input, target):
    return self._criterion(self(input), target)

  def _initialize_alphas(self):
    k = sum(1 for i in range(self._steps) for n in range(2+i))
    num_ops = len(PRIMITIVES)
    self.alphas_normal = Variable(1e-3*torch.randn(k, num_ops), requires_grad=True)
    self.alphas_reduce = Variable(1e-3*torch.randn(k, num_ops), requires_grad=True)
    self.mask_normal = torch.ones(k, num_ops)
    self.mask_reduce = torch.ones(k, num_ops)
    self._arch_parameters = [
      self.alphas_normal,
      self.alphas_reduce,
    ]

  def arch_parameters(self):
    return self._arch_parameters
