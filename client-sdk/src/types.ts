// The transaction JSON the server pushes (docs/contract.md, "Transactions"), typed per kind.

/** Statuses of every kind but `subscription`: Stripe's PaymentIntent statuses, plus the
 *  refund and dispute states paystream adds after success. A Checkout Session uses them too. */
export type PaymentIntentStatus =
  | "requires_payment_method" | "requires_confirmation" | "requires_action" | "processing"
  | "requires_capture" | "succeeded" | "canceled" | "partially_refunded" | "refunded" | "disputed";

/** A subscription's status is Stripe's own. It moves both ways (`active` → `past_due` → `active`). */
export type SubscriptionStatus =
  | "incomplete" | "incomplete_expired" | "trialing" | "active" | "past_due" | "unpaid" | "canceled" | "paused";

export type Status = PaymentIntentStatus | SubscriptionStatus;

export type Kind = Transaction["kind"];

/** A refund of the transaction, made through paystream or adopted from Stripe. */
export interface Refund {
  id: string;
  stripe_id: string | null;
  amount: number;
  currency: string;
  status: "pending" | "requires_action" | "succeeded" | "failed" | "canceled";
  reason: string | null;
  failure_reason: string | null;
}

interface Base {
  id: string;
  stripe_id: string | null;
  amount: number;
  currency: string;
  customer_id: string | null;
  metadata: Record<string, string>;
  last_error: { code?: string; message?: string; [k: string]: unknown } | null;
  validated: boolean;
  amount_refunded?: number;
  dispute?: { id: string; amount: number; currency: string; status: string } | null;
  refunds?: Refund[];
  seq: number;
  updated_at: string;
  /** On pushed events only. */
  previous_status?: Status | null;
  cause?: { stripe_event_id: string | null; type: string };
}

/** A PaymentIntent (`pi_…`), a $1 card validation (`seti_…`/`pi_…`) or a wallet top-up. */
export interface PaymentTransaction extends Base {
  kind: "payment" | "card_validation" | "wallet_top_up";
  status: PaymentIntentStatus;
  /** Wallet top-ups: the wallet after the change. */
  balance?: { customer_id: string; amount: number; currency: string };
}

/** An invoice (`in_…`); a subscription's first invoice and each renewal are their own. */
export interface InvoiceTransaction extends Base {
  kind: "invoice";
  status: PaymentIntentStatus;
  /** The `sub_…` it bills, or null for an invoice of no subscription. */
  subscription_id: string | null;
}

/** A Stripe Checkout Session (`cs_…`): Stripe's hosted page or a Payment Link. Its
 *  `status` reads as a payment's: `requires_payment_method` while open, `processing` when
 *  complete but unpaid (a delayed method), `succeeded` when paid, `canceled` when it expired
 *  (or, with `last_error`, when its delayed payment failed). */
export interface CheckoutTransaction extends Base {
  kind: "checkout";
  status: PaymentIntentStatus;
  session_status: "open" | "complete" | "expired";
  payment_status: "unpaid" | "paid" | "no_payment_required";
}

/** A subscription (`sub_…`). Times are ISO 8601 UTC, or null. */
export interface SubscriptionTransaction extends Base {
  kind: "subscription";
  status: SubscriptionStatus;
  current_period_end: string | null;
  cancel_at_period_end: boolean;
  trial_end: string | null;
  /** When `past_due`: the failed renewal's next retry. */
  next_payment_attempt: string | null;
}

/** Narrow on `kind` to reach a kind's own fields and statuses. */
export type Transaction = PaymentTransaction | InvoiceTransaction | CheckoutTransaction | SubscriptionTransaction;

/** Every status of every kind (what a long-poll may wait for). */
export const STATUSES: readonly Status[] = [
  "requires_payment_method", "requires_confirmation", "requires_action", "processing", "requires_capture",
  "succeeded", "canceled", "partially_refunded", "refunded", "disputed",
  "incomplete", "incomplete_expired", "trialing", "active", "past_due", "unpaid", "paused",
];

/** Statuses after which the server closes the stream (unless `follow`): a payment's (and a
 *  Checkout Session's) `succeeded`, `canceled`, `refunded`; a subscription's `canceled` and
 *  `incomplete_expired`. A subscription's stream stays open through `active`, `past_due` and
 *  the rest, since they move both ways. Kinds share a status only where both end there. */
export const FINAL: ReadonlySet<Status> = new Set<Status>(["succeeded", "canceled", "refunded", "incomplete_expired"]);
