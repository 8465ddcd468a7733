// Compiled by test/types.test.mjs (tsc --noEmit, strict): what the published types let a
// page write about each kind, and what they refuse (each @ts-expect-error must be an error).
import type { Transaction } from "@paystream/client";
import { FINAL, type Status, type SubscriptionStatus, waitFor } from "@paystream/client";
import { usePaymentStatus } from "@paystream/client/react";

export function describe(tx: Transaction): string {
  switch (tx.kind) {
    case "subscription": {
      const status: SubscriptionStatus = tx.status;
      const ends: string | null = tx.current_period_end;
      const leaving: boolean = tx.cancel_at_period_end;
      // @ts-expect-error a subscription has no session fields
      void tx.session_status;
      // @ts-expect-error nor a payment's statuses
      if (tx.status === "succeeded") return "never";
      return `${status} until ${ends ?? tx.trial_end} ${leaving} ${tx.next_payment_attempt}`;
    }
    case "checkout":
      // @ts-expect-error a session has a payment's statuses, not a subscription's
      if (tx.status === "active") return "never";
      return `${tx.status} ${tx.session_status satisfies "open" | "complete" | "expired"} ${tx.payment_status}`;
    case "invoice":
      return `${tx.status} of ${tx.subscription_id ?? "no subscription"}`;
    default:
      // @ts-expect-error only a subscription has a period
      void tx.current_period_end;
      return `${tx.kind} ${tx.status} ${tx.refunds?.map((r) => `${r.amount} ${r.status}`).join()}`;
  }
}

export const ended = (s: Status): boolean => FINAL.has(s);
// @ts-expect-error not a status of any kind
export const bogus: Status = "paid";

export async function untilActive(id: string, token: string): Promise<string> {
  const tx = await waitFor(id, { token, until: ["active", "trialing"] });
  return tx.status;
}

export function Plan({ id, token }: { id: string; token: string }): string {
  const { status, transaction } = usePaymentStatus(id, { token });
  if (status === "past_due" && transaction?.kind === "subscription") return transaction.next_payment_attempt ?? "";
  return status ?? "";
}
