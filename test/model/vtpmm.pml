/*
 * vtpmm.pml: the vTPM ownership protocol of vtpmm, for SPIN 6.5.
 *
 * One VM, three hosts (H0 owns it at generation 1 at the start), the
 * fleet registry's compare-and-swap (issue 12), the hypervisor's live
 * migration job, the hook-mode Pull, standby replicas and failover
 * (issue 15), restore (issue 14), the TPM rollback anchor and the
 * destination's authorisation (issue 10), vtpmd crashes, host power loss,
 * permanent host death, partitions from the registry, and a network that
 * loses, duplicates, delays and reorders messages. docs/model.md maps
 * every step to the code (file, function) or the issue that implements it.
 *
 * Configurations are budgets (B_*), set with -D by model_test.go. A
 * mutation (M_*) removes one rule of the design; a finding (TODAY_*,
 * ISSUE*_*) puts back today's code or an issue's text where the model
 * needed a stricter rule (F1-F14). model_test.go lists the ones that must
 * be refuted; docs/model.md lists them all.
 *
 * Properties (each an assertion on a hidden flag, so pan names it):
 *   p1_two_owners       at most one host runs the VM or can start it;
 *   p2_gen_backwards    the generation a host can start never goes back;
 *   p3_not_settled      in every final state (no step is possible any more)
 *                       exactly one live host owns the VM, in agreement
 *                       with the registry, with the VM's own key, and no
 *                       running vtpmd holds an open transaction or a
 *                       PENDING key;
 *   p4_fenced_owner     a host fenced at generation g can start the VM
 *                       again only at a generation above g.
 * ONLY_P<n> asserts just property n (the mutation tests); SKIP_P3 leaves
 * p3 out (rollback: a refused start waits for the operator).
 *
 * Every step is one d_step (or an atomic choice followed by one): a step
 * of the model is one step of one component that the code makes durable
 * or visible at once (a ledger write, a key store write, one registry
 * transaction, one message). The crash points of migrate/crash.go sit
 * between steps and are named in brackets.
 */

#define N    3          /* hosts H0..H2 */
#define NOH  3          /* no host / the operator */
#ifndef MAXTX
#define MAXTX 3         /* transactions (migrations, pulls, attacks) */
#endif
#define NS   6          /* messages in flight */

/* ---- budgets of the environment (per configuration) ---------------- */
#ifndef B_MIG
#define B_MIG 1         /* vtpmctl migrations */
#endif
#ifndef B_JOB
#define B_JOB 0         /* hook mode: plain 'virsh migrate' jobs */
#endif
#ifndef B_CRASH
#define B_CRASH 1       /* vtpmd crashes (restartable) */
#endif
#ifndef B_POWER
#define B_POWER 0       /* host power losses (restartable) */
#endif
#ifndef B_DEATH
#define B_DEATH 0       /* permanent host deaths */
#endif
#ifndef B_DROP
#define B_DROP 1        /* messages lost */
#endif
#ifndef B_DUP
#define B_DUP 1         /* messages duplicated */
#endif
#ifndef B_TMO
#define B_TMO 1         /* calls that time out although the answer is still coming */
#endif
#ifndef B_CUT
#define B_CUT 0         /* partitions of a host from the registry */
#endif
#ifndef B_START
#define B_START 1       /* cold starts by an operator / HA manager */
#endif
#ifndef B_FAILOVER
#define B_FAILOVER 0    /* promotions (0: no standby replicas at all) */
#endif
#ifndef B_RESTORE
#define B_RESTORE 0     /* restores of the VM's bundle by the operator */
#endif
#ifndef B_ROLLBACK
#define B_ROLLBACK 0    /* H0's whole data directory restored from its first backup */
#endif
#ifndef B_ATTACK
#define B_ATTACK 0      /* H2, enrolled but not the owner, sends Prepare+Finish with its own key */
#endif

/* ---- ledger states (migrate/ledger.go) ------------------------------ */
#define SB  1   /* src-begun */
#define SP  2   /* src-prepared */
#define SMO 3   /* src-migrated, outcome migrated */
#define SMF 4   /* src-migrated, outcome failed */
#define SC  5   /* src-committed */
#define SA  6   /* src-aborted */
#define DP  7   /* dst-pending */
#define DC  8   /* dst-committed */
#define DA  9   /* dst-aborted */
#define UNK 1   /* FACK: unknown transaction (ErrUnknownTx) */
#define OPEN(s) (((s) >= SB && (s) <= SMF) || (s) == DP)

/* ---- messages: type | from<<4 | to<<6 | tx<<8 | a<<11 | b<<15 ------ */
#define EVQ   1   /* Evidence request */
#define EVR   2   /* Evidence response */
#define PREP  3   /* Prepare (a = generation, b = 1: a key not the VM's) */
#define PACK  4   /* Prepare ack with key proof */
#define PNAK  5   /* Prepare refused */
#define FIN   6   /* Finish (a = 1 commit, 0 abort) */
#define FACK  7   /* Finish answer (a = DC, DA, UNK, or 0: error) */
#define STAT  8   /* Status */
#define SRES  9   /* Status answer (a = ledger state, b = VM runs there) */
#define PULL  10  /* hook mode: destination asks the owner to release */
#define PULLR 11  /* Pull answer (a = 1 released) */
#define REPL  12  /* replica refresh (a = generation) */
#define REST  13  /* restore: bundle key released to a host (a = generation) */
#define MK(zt,f,o,x,a,b) ((zt) | ((f) << 4) | ((o) << 6) | ((x) << 8) | ((a) << 11) | ((b) << 15))
#define MT(zm)  ((zm) & 15)
#define MF(zm)  (((zm) >> 4) & 3)
#define MTO(zm) (((zm) >> 6) & 3)
#define MX(zm)  (((zm) >> 8) & 7)
#define MA(zm)  (((zm) >> 11) & 15)
#define MB(zm)  (((zm) >> 15) & 1)

int net[NS];                   /* the network: a multiset, kept sorted */

/* ---- durable state of each host (survives vtpmd crash and power loss) */
byte key[N];                   /* generation of the active key (0: none) */
bit  kf[N];                    /* the active key is not the VM's key (attack) */
byte hwm[N];                   /* generation high-water mark (.seen) */
byte pend[N];                  /* generation of the PENDING key */
byte ptx[N];                   /* its transaction */
bit  pf[N];                    /* the PENDING key is not the VM's key */
byte repl[N];                  /* standby replica generation (issue 15) */
byte hold[N];                  /* ledger: the open transaction holding the VM */
byte led[N * (MAXTX + 1)];     /* ledger: state of each transaction */
#define LED(h, x) led[(h) * (MAXTX + 1) + (x)]
byte vown[N], vgen[N];         /* last view of the registry (taken when cut) */
#if B_ROLLBACK > 0
byte dsc[N];                   /* key store change counter in the data dir */
byte anchor[N];                /* TPM NV counter (issue 10) */
#define BUMP(h) dsc[h]++; anchor[h]++
#else
#define BUMP(h) skip
#endif

/* transactions, as both ledgers record them */
byte ntx;
byte tsrc[MAXTX + 1], tdst[MAXTX + 1], tgen[MAXTX + 1];
bit  tpul[MAXTX + 1];

/* ---- volatile state of each vtpmd (lost when it crashes) ------------ */
bit  up[N];                    /* vtpmd runs */
byte drv[N];                   /* transaction a Migrate/Pull/Finish drives */
byte dph[N];                   /* its phase */
#define P_EV   1   /* Evidence sent */
#define P_PREP 2   /* Prepare sent */
#define P_ACK  3   /* ack received, src-prepared not yet written */
#define P_HYP  4   /* hypervisor migrating */
#define P_HOK  5   /* hypervisor returned: migrated */
#define P_HKO  6   /* hypervisor returned: failed */
#define P_MIG  7   /* src-migrated written: commit next */
#define P_FIN  8   /* Finish sent */
#define P_DONE 9   /* Finish confirmed, not yet shredded */
#define P_ABT  10  /* abort sent (abortRemote) */
bit  vo[N];                    /* outcome of the driven tx: migrated */
byte rph[N];                   /* recovery waiting for Status of tx */
byte hp[N];                    /* Prepare: ledger written, keys not yet */
byte hc[N];                    /* Finish: key promoted, ledger not yet */
bit  hk[N];                    /* hook: migrate begin waits for a Pull */
bit  dirty[N];                 /* something changed since the last Reconcile */
byte fo[N], fgr[N];            /* failover: owner (+1) and generation read */

/* ---- hypervisor ----------------------------------------------------- */
bit  hostup[N];
bit  dead[N];
bit  vm[N];                    /* the VM runs on the host */
bit  sec[N];                   /* vTPM secret defined from the PENDING key */
byte jsrc = NOH, jdst = NOH;   /* the migration job */
byte jtx;                      /* 0: migrate begin; else swtpm on jdst uses tx jtx's key */
byte jdrv;                     /* tx of the Migrate that started it (0: virsh, hook mode) */

/* ---- registry (issue 12): VM record and host records ---------------- */
byte rown, rgen;               /* owner and generation: the fencing token */
byte rtx;                      /* open migration intent (Begin; the fix of finding F7) */
byte rlast;                    /* the transaction that set owner and generation (fix F9) */
bit  fenced[N];                /* host state fenced ... */
byte fg[N];                    /* ... at this generation (fix F11) ... */
byte fby[N];                   /* ... by this host + 1 (0: the operator) */
#ifdef ISSUE15_FENCE_FOREVER
#define FENCED(h) (fenced[h])
#else
#define FENCED(h) (fenced[h] && fg[h] >= rgen)   /* fenced for the VM's current record */
#endif
bit  lease[N];                 /* liveness lease */
bit  cut[N];                   /* host cut off from the registry */

/* ---- budgets left ---------------------------------------------------- */
byte nmig = B_MIG, njob = B_JOB, ncrash = B_CRASH, npower = B_POWER, ndeath = B_DEATH;
byte ndrop = B_DROP, ndup = B_DUP, ncut = B_CUT, nstart = B_START;
byte nfail = B_FAILOVER, nrest = B_RESTORE, nroll = B_ROLLBACK, natt = B_ATTACK;
byte ntmo = B_TMO;
byte rsent[N];                 /* replica refresh sent for generation */

/* ---- ghosts and property flags --------------------------------------- */
byte hi;                       /* highest generation any host could start */
hidden byte zi, zj, zk, zt, zc, zg, znl;
hidden int zm, ztmp;
hidden byte p1_two_owners, p2_gen_backwards, p3_not_settled, p4_fenced_owner;

/* ---- the start gate --------------------------------------------------
 * Design: the key store opens the key (not below the high-water mark),
 * no open transaction holds the VM (F2), the registry names this host
 * at this generation and it is not fenced; cut off from the registry,
 * the last view and a live lease must say so (F8). A PENDING key never
 * admits a cold start (F1). TODAY_GATE: cmd/vtpmd/daemon/hook.go
 * handleHookPrepare (Incoming, then DefineSecret). */
#if defined(TODAY_GATE)
#define GATE(h) (up[h] && (pend[h] != 0 || (key[h] != 0 && key[h] >= hwm[h])))
#define GGEN(h) (pend[h] != 0 -> pend[h] : key[h])
#else
#ifdef ISSUE12_LASTVIEW
#define VIEWOK(h) (vown[h] == h && vgen[h] == key[h])
#else
#define VIEWOK(h) (vown[h] == h && vgen[h] == key[h] && lease[h])
#endif
#ifdef TODAY_GATE_OPENTX
#define NOTX(h) 1
#else
#define NOTX(h) (hold[h] == 0)
#endif
/* M_GATE_NOFENCE: the gate ignores the host's fenced state; M_GATE_NOREG:
 * the gate ignores the registry (registry: none trusts the key store) */
#ifdef M_GATE_NOFENCE
#define GFENCED(h) 0
#else
#define GFENCED(h) FENCED(h)
#endif
#ifdef M_GATE_NOREG
#define REGOK(h) 1
#else
#define REGOK(h) (cut[h] -> VIEWOK(h) : (rown == h && rgen == key[h] && !GFENCED(h)))
#endif
#define GATE(h) (up[h] && key[h] != 0 && key[h] >= hwm[h] && NOTX(h) && REGOK(h))
#define GGEN(h) key[h]
#endif
#define LIVE(h) (vm[h] || GATE(h))

inline dirtyall() { dirty[0] = 1; dirty[1] = 1; dirty[2] = 1 }

/* ---- the network -----------------------------------------------------
 * send: into the first free slot (a vtpmd that is down refuses the
 * connection: the message is not sent), then sort the multiset. An answer
 * travels on the caller's connection: it is not sent when the caller no
 * longer waits for an answer about that transaction. */
#define ANSWER(mm) (MT(mm) == EVR || MT(mm) == PACK || MT(mm) == PNAK || MT(mm) == FACK || \
	MT(mm) == SRES || MT(mm) == PULLR)
#define WAITS(h, x) ((drv[h] == (x) && (dph[h] == P_EV || dph[h] == P_PREP || dph[h] == P_FIN || \
	dph[h] == P_ABT)) || rph[h] == (x) || hk[h])
inline send(mm) {
	if
	:: MTO(mm) < N && up[MTO(mm)] && (!ANSWER(mm) || WAITS(MTO(mm), MX(mm))) ->
		zi = 0;
		do
		:: zi < NS && net[zi] != 0 -> zi++
		:: zi < NS && net[zi] == 0 -> net[zi] = mm; break
		:: zi == NS -> break          /* the network is full: the message is lost */
		od;
		sortnet()
	:: else -> skip
	fi
}
inline sortnet() {
	zi = 0;
	do
	:: zi < NS - 1 ->
		zj = 0;
		do
		:: zj < NS - 1 - zi ->
			if
			:: net[zj] < net[zj + 1] -> ztmp = net[zj]; net[zj] = net[zj + 1]; net[zj + 1] = ztmp
			:: else -> skip
			fi;
			zj++
		:: else -> break
		od;
		zi++
	:: else -> break
	od;
	ztmp = 0; zi = 0; zj = 0
}
inline take(k) { zm = net[k]; net[k] = 0; sortnet() }
#define FOR(k, h) (net[k] != 0 && MTO(net[k]) == (h))

/* the job ends; a Migrate waiting in Hypervisor.Migrate learns the outcome */
inline jobend(ok) {
	if
	:: ok -> vm[jsrc] = 0; vm[jdst] = 1
	:: else -> skip
	fi;
	if
	:: jdrv != 0 && drv[jsrc] == jdrv && dph[jsrc] == P_HYP ->
		dph[jsrc] = (ok -> P_HOK : P_HKO)
	:: else -> skip
	fi;
	jsrc = NOH; jdst = NOH; jtx = 0; jdrv = 0;
	dirtyall()
}

/* a call that ends (timed out, or a new call about the same transaction
 * starts) leaves no answer behind: answers travel on the call's stream */
inline purge(h, x) {
	zi = 0;
	do
	:: zi < NS -> if :: net[zi] != 0 && MTO(net[zi]) == h && MX(net[zi]) == (x) && ANSWER(net[zi]) -> net[zi] = 0
	              :: else -> skip fi; zi++
	:: else -> break
	od;
	sortnet()
}

/* a vtpmd that dies loses its connections: what was on its way to it is
 * never delivered (its gRPC calls and the answers to them) */
inline reset(h) {
	if :: hk[h] && jdst == h && jtx == 0 -> jobend(0) :: else -> skip fi;   /* the hook's call fails */
	zi = 0;
	do
	:: zi < NS -> if :: net[zi] != 0 && MTO(net[zi]) == h -> net[zi] = 0 :: else -> skip fi; zi++
	:: else -> break
	od;
	sortnet();
	drv[h] = 0; dph[h] = 0; vo[h] = 0; rph[h] = 0; hp[h] = 0; hc[h] = 0; hk[h] = 0;
	fo[h] = 0; fgr[h] = 0
}

inline poweroff(h) {
	if
	:: jsrc == h || jdst == h -> jobend(0)
	:: else -> skip
	fi;
	hostup[h] = 0; up[h] = 0; vm[h] = 0; sec[h] = 0; reset(h);
	dirtyall()
}

/* issue 15: a fence agent powers the host off (and the registry marks it
 * fenced); the host may come back, fenced */
inline fence(h, by) {
	fenced[h] = 1; fby[h] = by;
	if :: fg[h] < rgen -> fg[h] = rgen :: else -> skip fi;
	if :: hostup[h] -> poweroff(h) :: else -> skip fi
}

/* ---- properties ------------------------------------------------------ */
inline check() {
	znl = 0; zc = 0;
	do
	:: zc < N ->
		if :: LIVE(zc) -> znl++ :: else -> skip fi;
		if
		:: GATE(zc) ->
			zg = GGEN(zc);
			if :: zg < hi -> p2_gen_backwards = 1 :: else -> hi = zg fi;
			if :: zg <= fg[zc] -> p4_fenced_owner = 1 :: else -> skip fi
		:: else -> skip
		fi;
		zc++
	:: else -> break
	od;
	if :: znl > 1 -> p1_two_owners = 1 :: else -> skip fi;
	zc = 0; zg = 0; znl = 0;
#if !defined(ONLY_P2) && !defined(ONLY_P3) && !defined(ONLY_P4)
	assert(!p1_two_owners);
#endif
#if !defined(ONLY_P1) && !defined(ONLY_P3) && !defined(ONLY_P4)
	assert(!p2_gen_backwards);
#endif
#if !defined(ONLY_P1) && !defined(ONLY_P2) && !defined(ONLY_P3)
	assert(!p4_fenced_owner);
#endif
	p1_two_owners = 0; p2_gen_backwards = 0; p4_fenced_owner = 0
}

/* settled: exactly one host can run the VM, it is the registry's owner
 * with the VM's key at the registry's generation, and no running vtpmd
 * holds an open transaction or a PENDING key. */
inline settled() {
	znl = 0; zc = 0; zg = NOH;
	do
	:: zc < N ->
		if :: LIVE(zc) -> znl++; zg = zc :: else -> skip fi;
		if :: up[zc] && (hold[zc] != 0 || pend[zc] != 0) -> p3_not_settled = 1 :: else -> skip fi;
		zc++
	:: else -> break
	od;
	if
	:: znl != 1 -> p3_not_settled = 1
	:: else ->
		if
		:: !(rown == zg && key[zg] == rgen && !kf[zg]) -> p3_not_settled = 1
		:: else -> skip
		fi
	fi;
#if !defined(ONLY_P1) && !defined(ONLY_P2) && !defined(ONLY_P4) && !defined(SKIP_P3)
	assert(!p3_not_settled)
#endif
}

/* ---- registry operations (fail when cut: fail closed) ---------------- */
/* the source's Begin before it dials: records the intent (one etcd Txn) */
#define MAYBEGIN(s) (!cut[s] && rown == s && rgen == key[s] && !FENCED(s) && \
	(rtx == 0 || !OPEN(LED(s, rtx))))

/* the commit CAS: owner, generation and the intent compared */
#ifdef M_NOCAS_COMMIT
#define CANCOMMIT(x) (1)
#else
#define CANCOMMIT(x) (rown == tsrc[x] && rgen + 1 == tgen[x] && rtx == x)
#endif
/* has transaction x committed? (the record names what set it: fix F9) */
#ifdef ISSUE12_OWNER_GEN_ONLY
#define COMMITTED(x) (rown == tdst[x] && rgen == tgen[x])
#else
#define COMMITTED(x) (rown == tdst[x] && rgen == tgen[x] && rlast == (x))
#endif
inline cascommit(x) { rown = tdst[x]; rgen = tgen[x]; rtx = 0; rlast = x }

/* ---- the source: Migrate (vtpmctl) and Pull (hook mode) -------------- */
/* migrate/release.go release: keys Get, precheck, Ledger.Begin, registry
 * Begin, Evidence */
inline begin(s, d, pulled) {
	ntx++;
	tsrc[ntx] = s; tdst[ntx] = d; tgen[ntx] = key[s] + 1; tpul[ntx] = pulled;
	rtx = ntx;
	LED(s, ntx) = SB; hold[s] = ntx;                       /* [src/after-begin] */
#ifndef TODAY_ANCHOR_COMMITS
	BUMP(s);            /* fix F13: the anchor counts an open transaction too
	                     * (migrate/anchor.go beginStep, after Ledger.Begin) */
#endif
	drv[s] = ntx; dph[s] = P_EV;
	send(MK(EVQ, s, d, ntx, 0, 0))
}

/* the source ends a transaction it drives with an abort it may decide
 * alone (abortLocal; registry Abort when it can reach the registry) */
inline srcabort(s, x) {
	if :: rtx == x && !cut[s] -> rtx = 0 :: else -> skip fi;
	LED(s, x) = SA; hold[s] = 0; drv[s] = 0; dph[s] = 0;
	dirtyall()
}

inline pullanswer(s, x, ok) {
	if :: tpul[x] -> send(MK(PULLR, s, tdst[x], x, ok, 0)) :: else -> skip fi
}

/* ---- message handling ------------------------------------------------- */
inline handle(me) {
	zt = MX(zm);
	if
	:: MT(zm) == EVQ -> send(MK(EVR, me, MF(zm), zt, 0, 0))    /* dest.go Evidence */
	:: MT(zm) == EVR ->                                       /* source.go destEvidence, wrap */
		if
		:: drv[me] == zt && dph[me] == P_EV ->                  /* [src/after-attest] */
			send(MK(PREP, me, tdst[zt], zt, tgen[zt], 0)); dph[me] = P_PREP
		:: else -> skip
		fi
	:: MT(zm) == PREP ->
		/* dest.go Prepare: Ledger.Begin refuses a replay or a busy VM */
		if
		:: LED(me, zt) != 0 || hold[me] != 0 || hp[me] != 0 -> send(MK(PNAK, me, MF(zm), zt, 0, 0))
#ifndef M_DST_ANYPREP
		/* issue 10 (authz.go): only from the registry's owner, at exactly its
		 * generation + 1, for the transaction it opened to this host, to a
		 * host that neither owns nor runs the VM */
		:: !(!cut[me] && rown == MF(zm) && rgen + 1 == MA(zm) && rtx == zt && tdst[zt] == me &&
		     key[me] == 0 && !vm[me]) ->
			send(MK(PNAK, me, MF(zm), zt, 0, 0))
#endif
		:: else ->
			LED(me, zt) = DP; hold[me] = zt; hp[me] = zt;     /* [dst/after-ledger] */
			pf[me] = MB(zm)
		fi
	:: MT(zm) == PACK ->                                       /* release: checkProofs */
		if
		:: drv[me] == zt && dph[me] == P_PREP ->
			dph[me] = P_ACK                                  /* [src/after-prepare] */
#ifdef M_EARLYSHRED
			; key[me] = 0                                    /* shreds before the destination confirmed */
#endif
		:: else -> skip
		fi
	:: MT(zm) == PNAK ->                                       /* release: abortRemote */
		if
		:: drv[me] == zt && dph[me] == P_PREP ->
			pullanswer(me, zt, 0);
			send(MK(FIN, me, tdst[zt], zt, 0, 0)); dph[me] = P_ABT; vo[me] = 0
		:: else -> skip
		fi
	:: MT(zm) == FIN ->
		/* dest.go Finish: idempotent; finishDest */
		if
		:: LED(me, zt) == 0 -> send(MK(FACK, me, MF(zm), zt, UNK, 0))
		:: LED(me, zt) == DC || LED(me, zt) == DA -> send(MK(FACK, me, MF(zm), zt, LED(me, zt), 0))
		:: LED(me, zt) == DP && MF(zm) == tsrc[zt] && hp[me] == 0 && hc[me] == 0 ->
			if
			:: MA(zm) == 1 ->
				/* promotes only once the registry shows this host at the new
				 * generation, set by this transaction (REG lane) */
#ifndef M_DST_ANYPREP
				if
				:: cut[me] || !COMMITTED(zt) -> send(MK(FACK, me, MF(zm), zt, 0, 0))
				:: else ->
#else
				if
				:: 1 ->
#endif
					if
					:: pend[me] != 0 && ptx[me] == zt && pend[me] > hwm[me] ->
						key[me] = pend[me]; kf[me] = pf[me]; hwm[me] = pend[me]; pend[me] = 0; ptx[me] = 0;
						BUMP(me); hc[me] = zt                     /* [dst/after-commit] */
					:: else ->
						if
						:: key[me] == tgen[zt] -> hc[me] = zt       /* promoted before a crash */
						:: else -> send(MK(FACK, me, MF(zm), zt, 0, 0))
						fi
					fi
				fi
			:: MA(zm) == 0 ->
				/* dropVM: refuses while the VM runs here, or (fix F6) while an
				 * incoming migration uses the key */
#ifdef TODAY_RECOVER_NOJOB
				if
				:: vm[me] -> send(MK(FACK, me, MF(zm), zt, 0, 0))
#else
				if
				:: vm[me] || (jdst == me && jtx == zt) -> send(MK(FACK, me, MF(zm), zt, 0, 0))
#endif
				:: else ->
					if :: ptx[me] == zt -> pend[me] = 0; ptx[me] = 0; sec[me] = 0 :: else -> skip fi;
					LED(me, zt) = DA; hold[me] = 0; dirtyall();
					send(MK(FACK, me, MF(zm), zt, DA, 0))
				fi
			fi
		:: else -> skip
		fi
	:: MT(zm) == FACK ->                                       /* finishSource, abortRemote */
		if
		:: drv[me] == zt && dph[me] == P_FIN ->
			if
			:: (vo[me] && MA(zm) == DC) || (!vo[me] && (MA(zm) == DA || MA(zm) == UNK)) ->
				dph[me] = P_DONE                             /* [src/after-finish] */
			:: else -> drv[me] = 0; dph[me] = 0; dirty[me] = 1   /* unresolved: recovery retries */
			fi
		:: drv[me] == zt && dph[me] == P_ABT ->
			if
			:: MA(zm) == DA || MA(zm) == UNK -> srcabort(me, zt)
			:: else -> drv[me] = 0; dph[me] = 0; dirty[me] = 1
			fi
		:: else -> skip
		fi
	:: MT(zm) == STAT -> send(MK(SRES, me, MF(zm), zt, LED(me, zt), vm[me]))   /* dest.go Status */
	:: MT(zm) == SRES ->
		if
		:: rph[me] == zt -> rph[me] = 0; decide(me, zt, 1, MA(zm), MB(zm))
		:: else -> skip
		fi
	:: MT(zm) == PULL ->
		/* pull.go Pull: owner, outgoing job to the caller (issue 10), not
		 * busy, then release as in Migrate */
		if
		:: key[me] != 0 && key[me] >= hwm[me] && hold[me] == 0 && drv[me] == 0 &&
		   jsrc == me && jdst == MF(zm) && ntx < MAXTX && MAYBEGIN(me) ->
			begin(me, MF(zm), 1)
		:: else -> send(MK(PULLR, me, MF(zm), 0, 0, 0))
		fi
	:: MT(zm) == PULLR ->                                      /* pull.go RequestPull */
		if
		:: hk[me] -> hk[me] = 0;
			if
			:: MA(zm) == 1 && jdst == me && jtx == 0 && pend[me] != 0 && sec[me] && ptx[me] == zt ->
				jtx = zt
			:: else -> if :: jdst == me && jtx == 0 -> jobend(0) :: else -> skip fi
			fi
		:: else -> skip
		fi
	:: MT(zm) == REPL ->
		if :: MA(zm) > repl[me] && key[me] == 0 -> repl[me] = MA(zm) :: else -> skip fi
	:: MT(zm) == REST ->
		/* issue 14: the bundle's key, released to this host's TPM, stored at
		 * the generation the registry gave the restore (KeyStore.Put) */
		if
		:: MA(zm) > hwm[me] && MA(zm) > key[me] && hold[me] == 0 ->
			key[me] = MA(zm); kf[me] = 0; hwm[me] = MA(zm); BUMP(me)
		:: else -> skip
		fi
	:: else -> skip
	fi;
	zm = 0; zt = 0
}

/* ---- recovery: migrate/reconcile.go, with the registry deciding ------- */
/* reach: the peer answered Status (st: its ledger state, prun: VM runs there) */
inline decide(me, x, reach, st, prun) {
	if
	:: cut[me] -> skip                                      /* no registry: wait */
	:: !cut[me] && tsrc[x] == me ->                         /* recoverSource */
		if
		:: COMMITTED(x) ->                                  /* someone committed: finish it */
			drv[me] = x; vo[me] = 1; dph[me] = P_FIN; send(MK(FIN, me, tdst[x], x, 1, 0))
		:: !COMMITTED(x) && rown == me && rgen + 1 == tgen[x] && rtx == x ->
			if
			:: vm[me] ->                                   /* the VM runs here: abort */
				send(MK(FIN, me, tdst[x], x, 0, 0)); srcabort(me, x)
			:: !vm[me] && reach && prun && CANCOMMIT(x) ->  /* the VM runs there: commit */
				cascommit(x); drv[me] = x; vo[me] = 1; dph[me] = P_FIN; send(MK(FIN, me, tdst[x], x, 1, 0))
			:: !vm[me] && reach && !prun && jsrc == NOH ->  /* runs nowhere, no job: abort */
				send(MK(FIN, me, tdst[x], x, 0, 0)); srcabort(me, x)
#ifndef TODAY_SRC_WAIT
			/* fix F12: the destination is gone (its lease expired) and may have
			 * run the VM: fence it, then abort; the VM restarts from this key */
			:: !vm[me] && !reach && jsrc == NOH && (!lease[tdst[x]] || FENCED(tdst[x])) ->
				fence(tdst[x], me + 1); srcabort(me, x)
#endif
			:: else -> skip                                 /* wait */
			fi
		:: else ->                                          /* intent gone or ownership moved on */
			if
			:: !COMMITTED(x) && !(rown == me && rgen + 1 == tgen[x] && rtx == x) ->
				send(MK(FIN, me, tdst[x], x, 0, 0)); srcabort(me, x)
			:: else -> skip
			fi
		fi
	:: !cut[me] && tsrc[x] != me ->                         /* recoverDest */
		if
		:: COMMITTED(x) && pend[me] != 0 && ptx[me] == x && pend[me] > hwm[me] ->
			key[me] = pend[me]; kf[me] = pf[me]; hwm[me] = pend[me]; pend[me] = 0; ptx[me] = 0; BUMP(me);
			hc[me] = x
		:: COMMITTED(x) && !(pend[me] != 0 && ptx[me] == x && pend[me] > hwm[me]) && key[me] == tgen[x] ->
			hc[me] = x
		:: !COMMITTED(x) && rtx == x && CANCOMMIT(x) && vm[me] && pend[me] != 0 && ptx[me] == x ->
			cascommit(x);                                   /* the VM runs here with this key */
			key[me] = pend[me]; kf[me] = pf[me]; hwm[me] = pend[me]; pend[me] = 0; ptx[me] = 0; BUMP(me);
			hc[me] = x
		:: !COMMITTED(x) && rtx == x && !vm[me] && reach && (st == 0 || st == SA) ->
			rtx = 0; dropdst(me, x)                         /* the source gave up */
		:: !COMMITTED(x) && rtx != x && (!vm[me] || (rown == me && key[me] == rgen)) ->
			dropdst(me, x)                                  /* dead transaction (the VM, if here, uses the active key) */
		:: else -> skip                                     /* wait */
		fi
	fi
}

inline dropdst(me, x) {
	if :: ptx[me] == x -> pend[me] = 0; ptx[me] = 0; sec[me] = 0 :: else -> skip fi;
	LED(me, x) = DA; hold[me] = 0; dirtyall()
}

/* a call may time out when no message of its transaction to or from the
 * caller is in flight any more, or (budget B_TMO) while one still is */
#define INF(k, h, x) (net[k] != 0 && MX(net[k]) == (x) && (MTO(net[k]) == (h) || MF(net[k]) == (h)))
#define INFLIGHT(h, x) (INF(0, h, x) || INF(1, h, x) || INF(2, h, x) || INF(3, h, x) || INF(4, h, x) || INF(5, h, x))
#define TMO(h, x) (ntmo > 0 || !INFLIGHT(h, x))
inline TMOTAKE(h, x) { if :: INFLIGHT(h, x) -> ntmo-- :: else -> skip fi; purge(h, x) }

/* Reconcile leaves a transaction alone while the hypervisor migrates the
 * VM (pull.go leased: pulled transactions only today, finding F6) */
#ifdef TODAY_RECOVER_NOJOB
#define LEASED(h) (tpul[hold[h]] && jsrc == h)
#else
#define LEASED(h) (jsrc == h || jdst == h)
#endif

proctype Host(byte me)
{
end:
	do
	/* ---- a message arrives (any slot: reordering) ---- */
	:: atomic { up[me] && (FOR(0, me) || FOR(1, me) || FOR(2, me) || FOR(3, me) || FOR(4, me) || FOR(5, me)) ->
		if
		:: FOR(0, me) -> zk = 0
		:: FOR(1, me) -> zk = 1
		:: FOR(2, me) -> zk = 2
		:: FOR(3, me) -> zk = 3
		:: FOR(4, me) -> zk = 4
		:: FOR(5, me) -> zk = 5
		fi;
		d_step { take(zk); zk = 0; handle(me); check() } }

	/* ---- Prepare, second half: PutPending, DefineSecret, ack ---- */
	:: d_step { up[me] && hp[me] != 0 ->
		zt = hp[me]; hp[me] = 0;
		if
		:: pend[me] != 0 || tgen[zt] <= hwm[me] || tgen[zt] <= key[me] ->   /* ErrStaleGeneration, ErrKeyExists */
			LED(me, zt) = DA; hold[me] = 0; send(MK(PNAK, me, tsrc[zt], zt, 0, 0))
		:: else ->
			pend[me] = tgen[zt]; ptx[me] = zt; sec[me] = 1;   /* [dst/after-keys] [dst/after-secrets] */
			send(MK(PACK, me, tsrc[zt], zt, 0, 0))
		fi;
		zt = 0; check() }
	/* ---- Finish, second half: ledger dst-committed ---- */
	:: d_step { up[me] && hc[me] != 0 ->
		zt = hc[me]; hc[me] = 0;
		LED(me, zt) = DC; hold[me] = 0; dirtyall();
		send(MK(FACK, me, tsrc[zt], zt, DC, 0));
		zt = 0; check() }

	/* ---- the source's Migrate / release, step by step ---- */
	:: d_step { up[me] && dph[me] == P_ACK ->
		zt = drv[me]; LED(me, zt) = SP;                     /* [src/after-prepared] */
		if
		:: tpul[zt] -> pullanswer(me, zt, 1); drv[me] = 0; dph[me] = 0
		:: !tpul[zt] && vm[me] && jsrc == NOH ->           /* Hypervisor.Migrate */
			jsrc = me; jdst = tdst[zt]; jtx = 0; jdrv = zt; dph[me] = P_HYP
		:: !tpul[zt] && !(vm[me] && jsrc == NOH) -> dph[me] = P_HKO
		fi;
		zt = 0; check() }
	:: d_step { up[me] && (dph[me] == P_HOK || dph[me] == P_HKO) ->   /* [src/after-hypervisor] */
		LED(me, drv[me]) = (dph[me] == P_HOK -> SMO : SMF);
		vo[me] = (dph[me] == P_HOK); dph[me] = P_MIG; check() }            /* [src/after-migrated] */
	:: d_step { up[me] && dph[me] == P_MIG ->                  /* registry Commit/Abort, then Finish */
		zt = drv[me];
		if
		:: cut[me] -> drv[me] = 0; dph[me] = 0               /* fail closed: recovery */
		:: !cut[me] && vo[me] && CANCOMMIT(zt) -> cascommit(zt);
			send(MK(FIN, me, tdst[zt], zt, 1, 0)); dph[me] = P_FIN
		:: !cut[me] && vo[me] && !CANCOMMIT(zt) && COMMITTED(zt) -> send(MK(FIN, me, tdst[zt], zt, 1, 0)); dph[me] = P_FIN
		:: !cut[me] && vo[me] && !CANCOMMIT(zt) && !COMMITTED(zt) ->   /* ownership moved on */
			send(MK(FIN, me, tdst[zt], zt, 0, 0)); srcabort(me, zt)
		:: !cut[me] && !vo[me] -> if :: rtx == zt -> rtx = 0 :: else -> skip fi;
			send(MK(FIN, me, tdst[zt], zt, 0, 0)); dph[me] = P_FIN
		fi;
		zt = 0; check() }
	:: d_step { up[me] && dph[me] == P_DONE ->            /* completeSource */
		zt = drv[me];
		if
		/* the code settles the Begin's step here (no TPM command) and
		 * advances only after a restart settled it; the counter and the
		 * directory move together, and the rollback restores the first
		 * backup, so the extra BUMP changes nothing the model checks */
		:: vo[me] -> key[me] = 0; kf[me] = 0; BUMP(me); LED(me, zt) = SC
		:: else -> LED(me, zt) = SA
		fi;
		hold[me] = 0; drv[me] = 0; dph[me] = 0; vo[me] = 0; dirtyall();
		zt = 0; check() }
	/* a call times out: its message or the answer was lost (or, B_TMO
	 * times, is only late); the caller retries when Reconcile runs */
	:: d_step { up[me] && dph[me] == P_EV && TMO(me, drv[me]) -> TMOTAKE(me, drv[me]);   /* destEvidence failed: abortLocal */
		zt = drv[me]; pullanswer(me, zt, 0); srcabort(me, zt); zt = 0; check() }
	:: d_step { up[me] && dph[me] == P_PREP && TMO(me, drv[me]) -> TMOTAKE(me, drv[me]); /* abortRemote */
		zt = drv[me]; pullanswer(me, zt, 0); vo[me] = 0;
		send(MK(FIN, me, tdst[zt], zt, 0, 0)); dph[me] = P_ABT; zt = 0; check() }
	:: d_step { up[me] && (dph[me] == P_ABT || dph[me] == P_FIN) && TMO(me, drv[me]) -> TMOTAKE(me, drv[me]);
		drv[me] = 0; dph[me] = 0; dirty[me] = 1; check() }

	/* ---- Reconcile (at start, and every 15 s while a transaction is open:
	 * the model runs it when something changed since the last run) ---- */
	:: d_step { up[me] && dirty[me] && hold[me] != 0 && drv[me] == 0 && rph[me] == 0 &&
	            hp[me] == 0 && hc[me] == 0 && !LEASED(me) ->
		dirty[me] = 0; zt = hold[me]; purge(me, zt);
		zc = (tsrc[zt] == me -> tdst[zt] : tsrc[zt]);
		if
		:: up[zc] -> rph[me] = zt; send(MK(STAT, me, zc, zt, 0, 0))
		:: else -> decide(me, zt, 0, 0, 0)                  /* peer unreachable */
		fi;
		zt = 0; zc = 0; check() }
	:: d_step { up[me] && rph[me] != 0 && TMO(me, rph[me]) -> TMOTAKE(me, rph[me]); zt = rph[me]; rph[me] = 0;
		decide(me, zt, 0, 0, 0); dirty[me] = 1; zt = 0; check() }          /* and retry later */

	/* ---- hook mode: libvirt's migrate begin on the destination ---- */
	:: d_step { up[me] && jdst == me && jtx == 0 && !hk[me] ->
		if
		/* a PENDING key serves only the job its transaction started: the
		 * job of that Migrate (vtpmctl), or the Pull below (hook mode) */
#ifdef TODAY_PULL_REUSE
		:: pend[me] != 0 && sec[me] -> jtx = ptx[me]       /* pull.go RequestPull: any PENDING key */
#else
		:: pend[me] != 0 && sec[me] && !cut[me] && rtx == ptx[me] && jdrv == ptx[me] -> jtx = ptx[me]
#endif
		:: else ->
			if
			:: jdrv == 0 && pend[me] == 0 -> hk[me] = 1; send(MK(PULL, me, jsrc, 0, 0, 0))
			:: else -> jobend(0)                           /* the hook exits 1 */
			fi
		fi;
		check() }
	:: d_step { up[me] && hk[me] && TMO(me, 0) -> TMOTAKE(me, 0); hk[me] = 0;   /* the pull timed out */
		if :: jdst == me && jtx == 0 -> jobend(0) :: else -> skip fi; check() }

	/* ---- standby: replica refresh sent by the owner ---- */
	:: d_step { B_FAILOVER > 0 && up[me] && !cut[me] && rown == me && key[me] == rgen && hold[me] == 0 &&
	            rsent[(me + 1) % N] < rgen && repl[(me + 1) % N] != 0 ->
		rsent[(me + 1) % N] = rgen; send(MK(REPL, me, (me + 1) % N, 0, rgen, 0)); check() }
	:: d_step { B_FAILOVER > 0 && up[me] && !cut[me] && rown == me && key[me] == rgen && hold[me] == 0 &&
	            rsent[(me + 2) % N] < rgen && repl[(me + 2) % N] != 0 ->
		rsent[(me + 2) % N] = rgen; send(MK(REPL, me, (me + 2) % N, 0, rgen, 0)); check() }

	/* ---- failover (issue 15): the standby races for the VM ---- */
	:: d_step { nfail > 0 && fo[me] == 0 && up[me] && !cut[me] && repl[me] != 0 && key[me] == 0 &&
	            hold[me] == 0 && rown != me && (!lease[rown] || FENCED(rown)) ->
		fo[me] = rown + 1; fgr[me] = rgen;
#ifndef M_NOFENCE
		fence(rown, me + 1);
#ifndef ISSUE15_FENCE_OWNER_ONLY
		/* fix F7: an open migration's destination may run the VM: fence it too */
		if :: rtx != 0 && tdst[rtx] != me -> fence(tdst[rtx], me + 1) :: else -> skip fi;
#endif
#endif
		check() }
	:: d_step { fo[me] != 0 && up[me] && !cut[me] ->
#ifdef M_NOCAS_FAILOVER
		if :: nfail > 0 ->
#else
		if :: nfail > 0 && rown == fo[me] - 1 && rgen == fgr[me] ->    /* the compare-and-swap */
#endif
			nfail--;
			rown = me; rgen = fgr[me] + 1; rtx = 0; rlast = 0;
			key[me] = rgen; kf[me] = 0; hwm[me] = rgen; repl[me] = 0; BUMP(me);
			vm[me] = 1                                      /* the promoted host starts it */
		:: else -> skip                                    /* lost the race */
		fi;
		fo[me] = 0; fgr[me] = 0; dirtyall(); check() }
#ifndef ISSUE15_FENCE_FOREVER
	/* fix F11: a failover that fenced this owner never promoted anyone and
	 * its standby is gone (lease expired): the owner takes the VM back with
	 * a Bump to the next generation, so that the standby's CAS, if it ever
	 * comes, fails */
	:: d_step { up[me] && !cut[me] && rown == me && key[me] == rgen && hold[me] == 0 && FENCED(me) &&
	            fby[me] != 0 && fby[me] != me + 1 && !lease[fby[me] - 1] ->
		rgen = rgen + 1; rtx = 0; rlast = 0;
		key[me] = rgen; hwm[me] = rgen; BUMP(me); dirtyall(); check() }
#endif
	od
}

/* ---- the environment: operator, hypervisor, faults ---------------- */
inline migrate(s, d) {
	d_step { nmig > 0 && up[s] && drv[s] == 0 && hold[s] == 0 && key[s] != 0 && key[s] >= hwm[s] &&
	         ntx < MAXTX && MAYBEGIN(s) ->
		nmig--; begin(s, d, 0); check() }
}
inline virsh(s, d) {
	d_step { njob > 0 && hostup[s] && hostup[d] && vm[s] && jsrc == NOH ->
		njob--; jsrc = s; jdst = d; jtx = 0; jdrv = 0; check() }
}

inline vtpmdstart(h) {
#if B_ROLLBACK > 0
	if
	:: dsc[h] < anchor[h] -> dead[h] = 1; hostup[h] = 0; vm[h] = 0   /* issue 10: refuses to start */
	:: else -> up[h] = 1; if :: !cut[h] -> lease[h] = 1 :: else -> skip fi
	fi;
#else
	up[h] = 1; if :: !cut[h] -> lease[h] = 1 :: else -> skip fi;
#endif
	dirtyall()       /* its Reconcile runs; and the peers', that retry every 15 s, now reach it */
}

inline faults(h) {
	if
	:: ncrash > 0 && up[h] -> d_step { ncrash--; up[h] = 0; reset(h); dirtyall(); check() }
	:: hostup[h] && !up[h] -> d_step { vtpmdstart(h); check() }
	:: npower > 0 && hostup[h] -> d_step { npower--; poweroff(h); check() }
	:: !hostup[h] && !dead[h] -> d_step { hostup[h] = 1; check() }   /* power back on (also after a fence) */
	:: ndeath > 0 && hostup[h] -> d_step { ndeath--; poweroff(h); dead[h] = 1; check() }
	:: ncut > 0 && !cut[h] -> d_step { ncut--; cut[h] = 1;   /* its last view: the VM record and its own host record */
		vown[h] = (FENCED(h) -> NOH : rown); vgen[h] = rgen; dirtyall(); check() }
	:: cut[h] -> d_step { cut[h] = 0; if :: up[h] -> lease[h] = 1 :: else -> skip fi; dirtyall(); check() }
	:: lease[h] && (!up[h] || cut[h]) -> d_step { lease[h] = 0; dirtyall(); check() }   /* the lease expires */
	:: nstart > 0 && hostup[h] && !vm[0] && !vm[1] && !vm[2] && GATE(h) -> d_step { nstart--; vm[h] = 1; check() }
	fi
}

proctype Env()
{
end:
	do
	:: migrate(0, 1)
	:: migrate(0, 2)
	:: migrate(1, 0)
	:: migrate(1, 2)
	:: migrate(2, 0)
	:: migrate(2, 1)
	:: virsh(0, 1)
	:: virsh(1, 0)
	:: virsh(0, 2)
	/* the hypervisor finishes the job that runs: success or failure */
	:: d_step { jtx != 0 && hostup[jsrc] && hostup[jdst] && vm[jsrc] -> jobend(1); check() }
	:: d_step { jsrc != NOH -> jobend(0); check() }
	/* faults */
	:: atomic { faults(0) }
	:: atomic { faults(1) }
	:: atomic { faults(2) }
	/* the network loses or duplicates a message */
	:: atomic { ndrop > 0 && (net[0] != 0 || net[1] != 0 || net[2] != 0 || net[3] != 0) ->
		if
		:: net[0] != 0 -> zk = 0
		:: net[1] != 0 -> zk = 1
		:: net[2] != 0 -> zk = 2
		:: net[3] != 0 -> zk = 3
		fi;
		d_step { ndrop--; take(zk); zk = 0; zm = 0; dirtyall(); check() } }
	:: atomic { ndup > 0 && (net[0] != 0 || net[1] != 0) && net[NS - 1] == 0 ->
		if
		:: net[0] != 0 -> zk = 0
		:: net[1] != 0 -> zk = 1
		fi;
		d_step { ndup--; send(net[zk]); zk = 0; check() } }
	/* restore (issue 14): the owner is gone (lease expired), the operator
	 * fences it and restores the bundle on another host at a generation
	 * above every one the registry has seen */
	/* fix F14: never onto the open migration's destination (it may run the
	 * VM with its PENDING key: the restored key could not be stored while
	 * that transaction holds the VM, and the transaction would never end) */
#ifdef ISSUE14_ANY_TARGET
#define RSKIP(h) ((h) == rown || !up[h] || cut[h])
#else
#define RSKIP(h) ((h) == rown || !up[h] || cut[h] || hold[h] != 0 || (rtx != 0 && (h) == tdst[rtx]))
#endif
	:: d_step { nrest > 0 && !lease[rown] -> nrest--;
		zc = 0;
		do
		:: zc < N && RSKIP(zc) -> zc++
		:: zc < N && !RSKIP(zc) -> break
		:: zc == N -> break
		od;
		if
		:: zc < N ->
			fence(rown, 0);
#ifndef ISSUE15_FENCE_OWNER_ONLY
			if :: rtx != 0 && tdst[rtx] != zc -> fence(tdst[rtx], 0) :: else -> skip fi;
#endif
#ifdef M_RESTORE_OLDGEN
			rown = zc; rgen = 1; rtx = 0; rlast = 0;                  /* the bundle's generation */
#else
			rown = zc; rgen = rgen + 1; rtx = 0; rlast = 0;
#endif
			send(MK(REST, NOH, zc, 0, rgen, 0))
		:: else -> skip
		fi;
		zc = 0; dirtyall(); check() }
	/* the operator retries a restore that did not take (until it does) */
#define ISREST(k) (MT(net[k]) == REST)
	:: d_step { B_RESTORE > 0 && nrest == 0 && up[rown] && key[rown] != rgen && hold[rown] == 0 &&
	            !ISREST(0) && !ISREST(1) && !ISREST(2) && !ISREST(3) && !ISREST(4) && !ISREST(5) &&
	            net[NS - 1] == 0 -> send(MK(REST, NOH, rown, 0, rgen, 0)); check() }
	/* the whole data directory of H0 (key store, ledger, last view) restored
	 * from its first backup while its vtpmd is down */
	:: d_step { nroll > 0 && !up[0] -> nroll--;
		key[0] = 1; kf[0] = 0; hwm[0] = 1; pend[0] = 0; ptx[0] = 0; hold[0] = 0;
		zc = 1; do :: zc <= MAXTX -> LED(0, zc) = 0; zc++ :: else -> break od; zc = 0;
		vown[0] = 0; vgen[0] = 1;
#if B_ROLLBACK > 0
		dsc[0] = 0;
#ifdef M_NOANCHOR
		anchor[0] = 0;
#endif
#endif
		check() }
	/* H2, enrolled but not the owner, sends its own key for the VM to the
	 * owner (issue 10 #1/#2) */
	:: d_step { natt > 0 && ntx < MAXTX && up[2] && rown != 2 -> natt--;
		ntx++; tsrc[ntx] = 2; tdst[ntx] = rown; tgen[ntx] = rgen + 1; tpul[ntx] = 0;
		send(MK(PREP, 2, rown, ntx, rgen + 1, 1));
		send(MK(FIN, 2, rown, ntx, 1, 0)); check() }
	od
}

active proctype Watch()
{
	timeout -> d_step { settled() }
}

init {
	atomic {
		key[0] = 1; hwm[0] = 1; rown = 0; rgen = 1; hi = 1; vm[0] = 1;
		hostup[0] = 1; hostup[1] = 1; hostup[2] = 1;
		up[0] = 1; up[1] = 1; up[2] = 1;
		lease[0] = 1; lease[1] = 1; lease[2] = 1;
		vown[0] = 0; vgen[0] = 1; vown[1] = 0; vgen[1] = 1; vown[2] = 0; vgen[2] = 1;
#if B_FAILOVER > 0
		repl[1] = 1; repl[2] = 1;
#endif
		run Host(0); run Host(1); run Host(2); run Env()
	}
}
