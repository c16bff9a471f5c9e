package attest

import (
	"bytes"
	"fmt"
	"sort"
	"strconv"
	"strings"
)

// logCheck is a parsed and replayed event log with its facts, as cached,
// with the exact bytes it was parsed from.
type logCheck struct {
	raw      []byte
	log      *EventLog
	replay   PCRValues
	facts    BootFacts
	factsErr error
}

// eventLog parses and replays raw, from the cache when the same bytes were
// seen before. Logs are tens of KiB, so the cache looks them up by a seeded
// 64-bit hash (maphash, several GB/s) and then compares the stored copy
// with raw byte for byte: only identical bytes are served, which is
// stronger than equal SHA-256 digests and costs a memory compare.
func (r *run) eventLog(raw []byte) (*logCheck, error) {
	cacheable := len(raw) <= maxCacheableLogLen
	var k cacheKey
	if cacheable {
		k = r.c.logKey(raw)
		if lc, ok := r.c.logs.get(k); ok && bytes.Equal(lc.raw, raw) {
			return lc, nil
		}
	}
	log, err := ParseEventLog(raw)
	if err != nil {
		return nil, err
	}
	lc := &logCheck{raw: bytes.Clone(raw), log: log, replay: log.Replay()}
	lc.facts, lc.factsErr = log.Facts()
	if cacheable {
		r.c.logs.put(k, lc, 2*len(raw))
	}
	return lc, nil
}

func (r *run) checkGolden(pcrs PCRValues, cov coverage) error {
	gp := r.v.Policy.GoldenPCRs
	if len(gp) == 0 {
		r.skip(RulePCRPolicy, "policy has no golden PCR values")
		return nil
	}
	banks := make([]string, 0, len(gp))
	for b := range gp {
		banks = append(banks, string(b))
	}
	sort.Strings(banks)
	n := 0
	for _, b := range banks {
		bank := Bank(b)
		idx := make([]int, 0, len(gp[bank]))
		for k := range gp[bank] {
			i, _ := strconv.Atoi(k)
			idx = append(idx, i)
		}
		sort.Ints(idx)
		for _, i := range idx {
			want := gp[bank][strconv.Itoa(i)]
			got, ok := pcrs[bank][i]
			if !ok || !cov.covers(bank, i) {
				return refuse(RulePCRPolicy, "PCR %d (%s) has a golden value but is not quoted", i, bank)
			}
			match := false
			for _, w := range want {
				match = match || bytes.Equal(got, w)
			}
			if !match {
				return refuse(RulePCRPolicy, "PCR %d differs from policy (%s got %s, want %s)", i, bank, short(got), short(want[0]))
			}
			n++
		}
	}
	r.pass(RulePCRPolicy, "%d PCR value(s) equal to policy", n)
	return nil
}

func (r *run) checkEventLog(lc *logCheck, pcrs PCRValues, cov coverage) error {
	pol := r.v.Policy.EventLog
	needLog := pol.Required || pol.RequireSecureBoot || len(pol.AllowedBootComponents) > 0
	if lc == nil {
		if needLog {
			return refuse(RuleEventLogReplay, "policy requires an event log, the evidence has none")
		}
		r.skip(RuleEventLogReplay, "no event log and the policy does not require one")
		return nil
	}
	log, replay := lc.log, lc.replay
	n := 0
	for _, bank := range log.Banks {
		for _, i := range replay.PCRs(bank) {
			if !cov.covers(bank, i) {
				continue
			}
			got := replay[bank][i]
			if !bytes.Equal(got, pcrs[bank][i]) {
				return refuse(RuleEventLogReplay, "%s PCR %d: the log replays to %s, the quote says %s%s", bank, i, short(got), short(pcrs[bank][i]), log.replayHint(i))
			}
			n++
		}
	}
	if n == 0 {
		return refuse(RuleEventLogReplay, "no quoted PCR is extended by the event log")
	}
	// The facts below come from PCR 7 and PCR 4: they must be covered.
	mustCover := func(pcr int) error {
		for _, bank := range log.Banks {
			if _, ok := replay[bank][pcr]; ok && cov.covers(bank, pcr) {
				return nil
			}
		}
		return refuse(RuleEventLogReplay, "PCR %d carries a policy fact but is not quoted in a bank of the log", pcr)
	}
	if pol.RequireSecureBoot {
		if err := mustCover(7); err != nil {
			return err
		}
	}
	if len(pol.AllowedBootComponents) > 0 {
		if err := mustCover(4); err != nil {
			return err
		}
	}
	r.pass(RuleEventLogReplay, "%d event(s) replay to %d quoted PCR value(s)%s", len(log.Events), n, log.replayNote())
	if lc.factsErr != nil {
		return refuse(RuleEventLogReplay, "%v", lc.factsErr)
	}
	facts := lc.facts
	r.res.Facts = &facts
	switch {
	case !pol.RequireSecureBoot:
		r.skip(RuleSecureBoot, "policy does not require secure boot")
	case facts.SecureBoot == nil:
		return refuse(RuleSecureBoot, "the event log does not measure the SecureBoot variable")
	case !*facts.SecureBoot:
		return refuse(RuleSecureBoot, "SecureBoot variable is 0 in the event log (PCR 7)")
	default:
		r.pass(RuleSecureBoot, "SecureBoot variable is 1 (PCR 7)")
	}
	if len(pol.AllowedBootComponents) == 0 {
		r.skip(RuleBootComponent, "policy lists no boot components")
		return nil
	}
	for _, ev := range facts.BootComponents {
		ok := false
		for _, d := range ev.Digests {
			for _, a := range pol.AllowedBootComponents {
				ok = ok || bytes.Equal(d, a)
			}
		}
		if !ok {
			var ds []string
			for b, d := range ev.Digests {
				ds = append(ds, fmt.Sprintf("%s %s", b, short(d)))
			}
			sort.Strings(ds)
			return refuse(RuleBootComponent, "boot application at event %d (%s) is not in the allowed list", ev.Index, strings.Join(ds, ", "))
		}
	}
	r.pass(RuleBootComponent, "%d boot application(s) all allowed", len(facts.BootComponents))
	return nil
}
