# What --long-weight favours: the tokens of the first finetuning batch with the largest p / p_short (LongCE), decoded.
# Run from the repository root after the README's gdn16 hybrid exists (out/gdn16.json); CPU, about a minute.
import sys; sys.path.insert(0, '.')
import torch, finetune, dash
fc = finetune.FinetuneConfig(arch='out/gdn16.json', out='/tmp/probe', long_weight=100.0)
arch, fc, cfg, teacher, state, data = finetune.prepare(fc)
short = finetune.student_of(teacher, ['swa'] * 8, {}, cfg, check=False)
tok = __import__('transformers').AutoTokenizer.from_pretrained(fc.model)
head = teacher.get_output_embeddings()
ids = data['finetune'][0]
with torch.no_grad():
    ht, hs = dash.final_hidden(teacher, ids), dash.final_hidden(short, ids)
    lsd = finetune.next_token_logprob(ht, ids, head, 1024) - finetune.next_token_logprob(hs, ids, head, 1024)
r = lsd.exp()
for cap in (5, 20, 100):
    w = r.clamp(max=cap); print(cap, 'share of weight in tokens with ratio>cap/2:', (w * (r > cap / 2)).sum().item() / w.sum().item(), 'n', (r > cap/2).sum().item(), 'of', r.numel())
idx = (r.flatten() > 50).nonzero()[:40, 0]
for i in idx.tolist():
    b, t = divmod(i, r.shape[1])
    print(round(r[b, t].item(), 1), repr(tok.decode(ids[b, max(0, t - 12):t + 1])), '->', repr(tok.decode(ids[b, t + 1:t + 2])))
