export type Status =
  | "requires_payment_method" | "requires_confirmation" | "requires_action" | "processing"
  | "requires_capture" | "succeeded" | "canceled" | "partially_refunded" | "refunded" | "disputed";

export interface Transaction {
  id: string;
  stripe_id: string | null;
  kind: "payment" | "card_validation" | "wallet_top_up" | "invoice";
  status: Status;
  amount: number;
  currency: string;
  customer_id: string | null;
  metadata: Record<string, string>;
  last_error: { code?: string; message?: string; [k: string]: unknown } | null;
  validated: boolean;
  amount_refunded?: number;
  seq: number;
  updated_at: string;
  /** On pushed events only. */
  previous_status?: Status | null;
  cause?: { stripe_event_id: string | null; type: string };
  balance?: { customer_id: string; amount: number; currency: string };
}

/** Statuses after which a waiting browser has its answer (the server closes the stream). */
export const FINAL: ReadonlySet<Status> = new Set(["succeeded", "canceled", "refunded"]);
